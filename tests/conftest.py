"""Fixtures shared by several test files: the backbones are built once per session."""
from __future__ import annotations

import pytest

from pipeline.backbones import Backbone, create_backbone


@pytest.fixture(scope="session")
def vit_tiny() -> Backbone:
    return create_backbone("vit_tiny_random")


@pytest.fixture(scope="session")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0")
