"""fm inside other trainers, as optional imports (each module names the extra it needs;
importing this package imports no trainer).

trl   `FMCallback`: fm's detector and diagnoser on a TRL / transformers Trainer's logs,
      online, with stop or rollback on alarm (extra `trl`).
tunix `Manager`: fm inside a Tunix GRPO learner — statistics in its compiled step, the
      detector, diagnosis and remediation through its checkpoints and settings (extra
      `tunix`).
"""
