"""fm on the logs of trainers it does not run in: TRL, verl, OpenRLHF, TensorBoard, rftjax.

  mappings  one declared, versioned table per trainer: its metric names -> fm signal names
  readers   log files -> step records (clear errors for missing, empty or malformed logs)
  load      records + table -> fm signals per step, with every metric name accounted for
  views     which fault types a log's signals can show and tell apart
  monitor   fm's detector and diagnoser fed one logged step at a time (offline and online)
  learned   the learned diagnoser per view: what it reads, its artifacts, which one a log gets
  evaluate  FaultBench records reduced to each trainer's view, scored (`python -m
            fm.logs.evaluate`)

`python -m fm.analyze` is the command line; `fm.integrations.trl` the online TRL callback.
"""
