"""FaultBench for fm: the record schema, event-level scoring and baseline detectors.

    records = fm.faultbench.records.load("campaign/")
    report = fm.faultbench.report.evaluate(records, ["fm", "zscore"], window=50)

`harm` labels each faulted run against its clean twin (inert, harmless, harmful); `power`
scores detection against fault magnitude at one false-alarm budget. Scoring and baselines
work on numpy arrays; reading and writing the Parquet tables imports
pyarrow, the learned baselines scikit-learn and the plots matplotlib, each only when used.
Nothing here imports a trainer: any trainer that writes these tables can be scored.
"""

from fm.faultbench import baselines, harm, power, records, report, schema, scoring

__all__ = ["baselines", "harm", "power", "records", "report", "schema", "scoring"]
