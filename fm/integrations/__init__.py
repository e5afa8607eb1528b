"""fm inside other trainers, as optional imports (each module names the extra it needs).

trl   `FMCallback`: fm's detector and diagnoser on a TRL / transformers Trainer's logs,
      online, with stop or rollback on alarm (extra `trl`).
"""
