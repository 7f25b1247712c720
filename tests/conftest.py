"""Shared test setup: quiet TensorFlow, keep runs small and deterministic."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
