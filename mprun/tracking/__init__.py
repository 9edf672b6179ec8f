"""Experiment tracking behind a small interface: MLflow, or nothing. Only this subpackage imports mlflow.

- config.py          the tracking group's schemas (imports neither torch nor mlflow)
- base.py            the Tracker interface the runner uses, and NullTracker (tracking=none)
- store.py           one MLflow tracking store: URIs, probes, runs, searches, artifacts; the only code that talks to
                     MlflowClient
- metric_writer.py   metric batches written off the training thread, in flushes
- uris.py            store URIs: how one is shown (a password hidden), what kind of store it names, the default
- failover.py        tracking.on_unreachable: what happens when the store cannot be used
- mlflow_tracker.py  MlflowTracker: a Store, a BatchedWriter and the Failover policy

The store is used with explicit run ids, never MLflow's fluent API and its process-global "active run", so a worker
process that runs several jobs cannot leak a run from one into the next.
"""

import os

# MLflow's usage telemetry stays off unless the user turns it on: its background thread sets and unsets an
# environment variable while `requests` reads the environment for proxies, which fails a request to a tracking
# server now and then (a KeyError). Set here, before any module of this package imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
