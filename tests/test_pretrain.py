"""Masked image modelling on real H&E tiles: the loss falls, the weights load into the expression model, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import st_from_he as sth
from st_from_he.models._encoders import ImageEncoder
from st_from_he.models._mim import MaskedImageModel, random_patch_mask
from st_from_he.tl._pretrain import pretrain_encoder

# Tiles of 112 um at 32-64 px: the her2st JPEG is read at a 4x reduced level, so a test cuts its tiles in seconds.
SIZE_UM = 112.0
VIT = {"encoder": "vit_tiny_patch16_224", "encoder_kwargs": {"depth": 1}}


@pytest.fixture(scope="module")
def c6(her2st_dir):
    """Section C6 with its tissue mask stored (``C6_tissue``), so each call skips tissue detection."""
    sdata = sth.datasets.her2st(["C6"], path=her2st_dir)
    sth.pp.detect_tissue(sdata, "C6_image", key_added="C6_tissue")
    return sdata


@pytest.fixture(scope="module")
def slide(her2st_dir):
    """The H&E image of C6 read on its own, without spots or counts (an H&E-only slide)."""
    return sth.io.read_image(her2st_dir / "C6" / "C6_HE.jpg", sample_id="slide", pixel_size_um=0.69)


def _run(sdatas, path, **kwargs):
    options = {"size_um": SIZE_UM, "size_px": 64, "n_tiles": 64, "batch_size": 16, "progress_bar": False}
    return pretrain_encoder(sdatas, path=path, **(options | kwargs))


def _quarter_means(history):
    n = max(1, len(history) // 4)
    return history["loss"].head(n).mean(), history["loss"].tail(n).mean(), history["flat_loss"].tail(n).mean()


# ---- the torch module -----------------------------------------------------------------------------------------------


def test_random_patch_mask_hides_a_fixed_share():
    mask = random_patch_mask(5, 4, 0.6, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4, 4) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [10] * 5  # round(0.6 * 16)
    assert not torch.equal(mask[0], mask[1])  # each image its own cells
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_patch_mask(2, 4, ratio)


def test_token_masking_hides_the_pixels_from_a_vit():
    """With SimMIM masking, changing hidden pixels changes nothing; changing a visible one changes the output."""
    torch.manual_seed(0)
    mim = MaskedImageModel(ImageEncoder(VIT["encoder"], img_size=64, **VIT["encoder_kwargs"]), img_size=64).eval()
    assert (mim.method, mim.grid, mim.mask_patch_px, mim.stride) == ("token", 4, 16, 16)
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True  # rows 16-31, columns 32-47
    with torch.no_grad():
        base = mim.feature_map(images)
        mim._token_mask = mask
        masked = mim.feature_map(images)
        changed_hidden = images.clone()
        changed_hidden[..., 16:32, 32:48] += 5
        assert torch.allclose(mim.feature_map(changed_hidden), masked)
        changed_visible = images.clone()
        changed_visible[..., 0:16, 0:16] += 5
        assert not torch.allclose(mim.feature_map(changed_visible), masked, atol=1e-4)
        mim._token_mask = None
        assert not torch.allclose(base, masked, atol=1e-4)  # the mask token did replace a token
        assert torch.allclose(mim.feature_map(images), base)  # and the hook is inactive outside forward()


def test_pixel_masking_and_loss_cover_hidden_patches_only():
    torch.manual_seed(0)
    mim = MaskedImageModel(ImageEncoder("sth_tinycnn"), img_size=64, loss="l2").eval()
    assert (mim.method, mim.grid, mim.stride) == ("pixel", 4, 16)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = mask[:, 2, 3] = True  # pixels y 0-15, x 0-15 and y 32-47, x 48-63
    changed = images.clone()
    changed[..., :16, :16] += 5
    with torch.no_grad():  # the encoder never sees hidden pixels
        assert torch.equal(mim(images, mask)["prediction"], mim(changed, mask)["prediction"])

    class Fixed(torch.nn.Module):  # a decoder whose prediction the test chooses
        value = torch.zeros(2, 3, 64, 64)

        def forward(self, fmap):
            return self.value

    mim.decoder = Fixed()
    zero = mim(images, mask)
    # the prediction 0 is the flat colour of each patch: its L2 error is the mean squared standardised target
    patch = images[..., :16, :16].reshape(2, -1)
    variance = patch.var(1, unbiased=True)
    assert torch.allclose(zero["loss"], zero["loss"].new_tensor(1.0), atol=0.05)
    assert float((variance / (variance + 0.01)).min()) > 0.95
    Fixed.value = torch.randn(2, 3, 64, 64)
    Fixed.value[..., :16, :16] = 0
    Fixed.value[..., 32:48, 48:] = 0
    assert torch.allclose(mim(images, mask)["loss"], zero["loss"])  # visible predictions do not count
    # the standardised pixels of the hidden patches as prediction: no error left, the yardstick unchanged
    target = torch.zeros(2, 3, 64, 64)
    for ys, xs in ((slice(0, 16), slice(0, 16)), (slice(32, 48), slice(48, 64))):
        block = images[..., ys, xs]
        mean = block.mean((1, 2, 3), keepdim=True)
        target[..., ys, xs] = (block - mean) / (block.var((1, 2, 3), keepdim=True) + 0.01).sqrt()
    Fixed.value = target
    exact = mim(images, mask)
    assert float(exact["loss"]) < 1e-8 and torch.allclose(exact["flat_loss"], zero["flat_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_patch_px": 24}, "divisor"),
        ({"mask_patch_px": 64}, "1 x 1 grid"),
        ({"loss": "huber"}, "loss"),
        ({"method": "token"}, "patch_embed"),
    ],
)
def test_masked_image_model_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedImageModel(ImageEncoder("sth_tinycnn"), img_size=64, **kwargs)


# ---- pretrain_encoder on real tiles ---------------------------------------------------------------------------------


def test_cnn_learns_and_its_weights_load_into_the_expression_model(c6, tmp_path):
    from st_from_he.models import ExpressionModule

    path = tmp_path / "tinycnn.safetensors"
    result = _run(c6, path, max_steps=60, lr=3e-3)
    history = result.history
    assert result.path == str(path) and list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert result.tiles == {"0:C6_image": 64} and len(history) == 60
    first, last, flat = _quarter_means(history)
    assert last < 0.95 * first  # the reconstruction error falls
    assert last < flat  # below filling hidden patches with the average colour: context was used
    assert result.params["method"] == "pixel" and result.params["stopped_by"] == "max_steps"

    saved = load_file(path)
    model = sth.tl.ExpressionModel(["ERBB2", "KRT19"], encoder="sth_tinycnn", img_size=64, encoder_weights=result.path)
    module = ExpressionModule(model.config, n_genes=2)  # what ExpressionModel.fit builds
    state = module.encoder.model.state_dict()
    assert set(saved) == set(state)  # every tensor, no extra one (strict)
    assert all(torch.equal(state[k], saved[k]) for k in state)
    torch.manual_seed(0)
    random = ExpressionModule(sth.tl.ExpressionModel(["ERBB2", "KRT19"], encoder="sth_tinycnn", img_size=64).config, 2)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():  # the embedding (mean token) of the model's encoder
        pretrained = module.eval().encoder.pool(module.encoder(images))
        baseline = random.eval().encoder.pool(random.encoder(images))
    assert not torch.allclose(pretrained, baseline, atol=1e-3)


def test_vit_learns_and_loads_strictly(c6, tmp_path):
    path = tmp_path / "vit.safetensors"
    result = _run(c6, path, max_steps=40, lr=1e-3, **VIT)
    first, last, _ = _quarter_means(result.history)
    assert result.params["method"] == "token" and last < 0.95 * first
    encoder = ImageEncoder(VIT["encoder"], img_size=64, **VIT["encoder_kwargs"])
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    encoder.model.load_state_dict(load_file(path), strict=True)
    assert any(not torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())
    # the encoder the expression model builds (from its name, kwargs and file) holds exactly these weights
    loaded = ImageEncoder(VIT["encoder"], weights=path, img_size=64, **VIT["encoder_kwargs"])
    expected = encoder.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_he_only_slide_and_several_sdatas(c6, slide, tmp_path):
    """A slide with no table is tiled like a measured section; tiles are shared evenly; no input is modified."""
    elements = (set(c6.shapes), set(c6.labels), set(slide.shapes), set(slide.labels))
    result = _run([c6, slide], tmp_path / "both.safetensors", size_px=32, n_tiles=40, max_steps=3)
    assert result.tiles == {"0:C6_image": 20, "1:slide_image": 20}
    assert len(result.history) == 3 and np.isfinite(result.history["loss"]).all()
    assert (set(c6.shapes), set(c6.labels), set(slide.shapes), set(slide.labels)) == elements
    alone = _run(slide, tmp_path / "slide.safetensors", size_px=32, n_tiles=None, max_epochs=1, batch_size=512)
    assert alone.tiles["0:slide_image"] > 300  # every tissue tile of C6 (17% of the slide), one step
    assert len(alone.history) == 1 and alone.params["stopped_by"] == "max_epochs"
    timed = _run(slide, tmp_path / "timed.safetensors", size_px=32, n_tiles=32, max_time=1e-9)
    assert len(timed.history) == 1 and timed.params["stopped_by"] == "max_time"  # the budget is checked between steps


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_pretrain_errors(c6, tmp_path):
    from PIL import Image

    path = tmp_path / "w.safetensors"
    for ratio in (0, 1, 1.2):
        with pytest.raises(ValueError, match="mask_ratio"):
            _run(c6, path, mask_ratio=ratio)
    with pytest.raises(ValueError, match="Unknown encoder 'not_a_model'"):
        _run(c6, path, encoder="not_a_model")
    with pytest.raises(ValueError, match="must end in '.safetensors'"):
        _run(c6, tmp_path / "w.pt")
    with pytest.raises(KeyError, match="in none of the SpatialData"):
        _run(c6, path, image_keys=["B1_image"])
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _run(c6, path)
    assert path.read_bytes() == b"keep me"

    Image.fromarray(np.full((600, 600, 3), 240, np.uint8)).save(tmp_path / "blank.png")
    blank = sth.io.read_image(tmp_path / "blank.png", sample_id="blank", pixel_size_um=1.0)
    with pytest.raises(ValueError, match="No tissue found on image 'blank_image'"):
        _run(blank, tmp_path / "blank.safetensors")
    assert not (tmp_path / "blank.safetensors").exists()
