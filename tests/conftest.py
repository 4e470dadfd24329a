"""Shared fixtures. Nothing here may reach a model hub."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.fixtures_models import real_hf_model, real_model_dir, tiny_model_dir  # noqa: E402, F401
from tests.fixtures_postgres import postgres_server, postgres_url, store_url  # noqa: E402, F401

logging.getLogger("libp2p").setLevel(logging.ERROR)
