"""Fixtures: every architecture variant (tests/support/models.py), and a fixed seed for each test."""

from __future__ import annotations

import pytest
import torch

from tests.support.models import VARIANTS


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
