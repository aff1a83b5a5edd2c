"""Test helpers for gradguard: tiny random-weight models and batches (see :mod:`gradguard.testing.models`)."""
