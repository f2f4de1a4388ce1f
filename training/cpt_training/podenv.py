"""The facts the platform injects into a stage's pod as environment variables, read here only.

Tuning lives in the typed stage config (:mod:`cpt_training.config`); what stays environment is
what the pod itself decides and the config cannot know: which node the pod is (the downward
API's pod UID), where its volumes are mounted (scratch and cache directories), and the log
level of the process. Each is read when asked for, never at import time.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

NODE_ID_ENV = "CPT_NODE_ID"
"""The pod's UID from the downward API: one id per node of a multi-node run."""
WORK_DIR_ENV = "CPT_WORK_DIR"
"""Big scratch volume for conversion and export (else the temp dir)."""
CACHE_DIR_ENV = "CPT_CACHE_DIR"
"""Where fetched model directories are cached."""
DATA_CACHE_ENV = "CPT_DATA_CACHE"
"""Where tokenized shards are cached on the node."""
LOG_LEVEL_ENV = "CPT_LOG_LEVEL"
"""The stage process's log level (INFO by default)."""


def node_id() -> str:
    """Which node this process is on: ``CPT_NODE_ID`` if set, else the hostname (pod name)."""
    return os.environ.get(NODE_ID_ENV) or socket.gethostname()


def work_base() -> Path:
    """The scratch volume's root: ``CPT_WORK_DIR`` or the temp dir."""
    return Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir())


def model_cache_dir() -> Path:
    """Cache of fetched model directories: ``CPT_CACHE_DIR`` or ``/tmp/cpt-cache``."""
    return Path(os.environ.get(CACHE_DIR_ENV, "/tmp/cpt-cache"))


def data_cache_dir() -> Path:
    """Node cache of tokenized shards: ``CPT_DATA_CACHE`` or ``<tmp>/cpt-data``."""
    return Path(os.environ.get(DATA_CACHE_ENV) or Path(tempfile.gettempdir(), "cpt-data"))


def log_level() -> str:
    """The process's log level name, upper case (``CPT_LOG_LEVEL``, default INFO)."""
    return os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
