"""tltrain: fine-tune pretrained image models from a YAML job spec on Ray (see docs/ARCHITECTURE.md)."""

import os as _os

__version__ = "0.1.0"

# Set in the runtime env of a job whose driver keeps library output off the terminal (the
# driver's tltrain log level): a Ray worker or actor of it marks tltrain's log lines so the driver
# forwards exactly those (reports/console.py, execution/trainer.ensure_ray).
WORKER_LOG_ENV = "TLTRAIN_WORKER_LOG_LEVEL"

if _os.environ.get(WORKER_LOG_ENV):
    from tltrain.reports.console import mark_worker_logs as _mark

    _mark()
