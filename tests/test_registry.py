"""One Registry contract for every registry, and every registered entry checked to work."""
from __future__ import annotations

import pytest
import torch

from pipeline.backbones import BACKBONES, create_backbone
from pipeline.cam import CAM_METHODS
from pipeline.data import DATASETS, get_reader
from pipeline.errors import InputError
from pipeline.evaluate import PROTOCOLS
from pipeline.registry import Registry
from pipeline.settings import SETTINGS
from pipeline.stages import STAGES

REGISTRIES = {"backbones": BACKBONES, "datasets": DATASETS, "protocols": PROTOCOLS, "settings": SETTINGS,
              "cam methods": CAM_METHODS, "stages": STAGES}


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_every_registry_is_one_registry_class(name):
    registry = REGISTRIES[name]
    assert isinstance(registry, Registry) and len(registry) > 0
    assert registry.names() == list(registry) and all(n in registry for n in registry)


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_unknown_name_is_an_input_error_listing_the_known_ones(name):
    registry = REGISTRIES[name]
    with pytest.raises(InputError) as info:
        registry.get("no-such-entry")
    message = str(info.value)
    assert f"unknown {registry.kind} 'no-such-entry'" in message
    assert all(known in message for known in registry.names())


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_registering_a_name_twice_is_an_error(name):
    registry = REGISTRIES[name]
    first = registry.names()[0]
    before = registry.get(first)
    with pytest.raises(ValueError, match=f"'{first}' is already registered"):
        registry.register(first, object())
    assert registry.get(first) is before        # the first definition is kept


def test_close_misspelling_is_suggested():
    with pytest.raises(InputError, match=r"unknown setting 'camvd' \(did you mean 'camvid'\?\)"):
        SETTINGS.get("camvd")
    local: Registry[int] = Registry("thing", param="section.key")
    local.register("one", 1)
    assert local.register("two")(2) == 2 and local.get("two") == 2
    with pytest.raises(InputError, match=r"unknown thing 'three' \(section.key\); known: one, two"):
        local.get("three")


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_and_embeds(name):
    backbone = create_backbone(name, pretrained=name == "efficientnet_lite0")  # only Lite0's weights are offline
    assert backbone.name == name and backbone.cam_method in CAM_METHODS
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(x)
    grid = (64 // backbone.patch_size, 96 // backbone.patch_size)
    assert out.patch.shape == (1, *grid, backbone.embed_dim) and out.embedding.shape == (1, backbone.embed_dim)
    assert torch.isfinite(out.patch).all() and not all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_reader_is_complete(name, tmp_path):
    reader = get_reader(name)
    assert reader.name == name and reader.decoder is not None
    assert reader.class_names is None or len(reader.class_names) >= 2
    with pytest.raises(InputError, match=str(tmp_path)):    # an empty folder is refused by name
        from pipeline.data import build_manifest

        build_manifest(name, tmp_path)


@pytest.mark.parametrize("name", PROTOCOLS.names())
@pytest.mark.parametrize("native", [(360, 480), (480, 360), (100, 100)])
def test_every_protocol_scores_a_window_inside_its_target(name, native):
    protocol = PROTOCOLS.get(name)
    assert protocol.name == name and protocol.description
    size = protocol.target_size(native, (224, 224))
    y0, x0, y1, x1 = protocol.crop(size)
    assert 0 <= y0 < y1 <= size[0] and 0 <= x0 < x1 <= size[1]


@pytest.mark.parametrize("name", STAGES.names())
def test_every_stage_runs_a_function_it_declares(name):
    stage = STAGES.get(name)
    assert stage.name == name and callable(stage.function())
    assert set(stage.inputs).isdisjoint(stage.outputs)
