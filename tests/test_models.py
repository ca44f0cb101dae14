import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from st_from_he.models import (
    BatchAugment,
    ExpressionModule,
    GeneEncoder,
    ImageEncoder,
    MaskedCrossModalFusion,
    ModelConfig,
    MultiScaleFusion,
    NeighbourAttention,
    ProjectionHead,
    RegressionHead,
    SNNGeneTokens,
    combine_losses,
    lower_resolution,
    reconstruction_loss,
    retrieve,
    soft_contrastive_loss,
)

torch.set_num_threads(2)

N_GENES = 12
IMG = 32


def tiny_config(**kwargs) -> ModelConfig:
    defaults = {"encoder": "sth_tinycnn", "img_size": IMG, "proj_dim": 32, "n_heads": 4, "n_gene_tokens": 4}
    return ModelConfig(**(defaults | kwargs))


def random_batch(n: int = 8, scales: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, scales, 3, IMG, IMG, generator=g),
        "expression": torch.rand(n, N_GENES, generator=g) * 3,
    }


# -- config -------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_reference():
    c = ModelConfig()
    assert (c.proj_dim, c.tau, c.n_gene_tokens, c.snn_hidden, c.snn_dropout) == (256, 1.0, 8, 2048, 0.25)
    assert (c.mask_ratio, c.n_fusion_blocks, c.lr, c.weight_decay, c.top_k) == (0.5, 2, 1e-4, 1e-3, 50)
    assert c.context_scales == (1.0,) and c.contrastive and c.use_reconstruction
    assert not (c.neighbour_attention or c.regression_head)
    assert c.augment_flips and c.augment_rot90
    assert c.augment_color == c.augment_stain == c.augment_rescale == c.augment_lowres == 0


def test_config_json_round_trip():
    c = tiny_config(context_scales=(1.0, 3.0), encoder_kwargs={"drop_rate": 0.1}, regression_head=True)
    restored = ModelConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert restored == c
    assert restored.context_scales == (1.0, 3.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"proj_dim": 30}, {"mask_ratio": 1.0}, {"context_scales": ()}, {"contrastive": False}],
)
def test_config_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError, match="must|Enable"):
        tiny_config(**kwargs)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})


# -- encoders -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "n_tokens", "dim"),
    [
        ("sth_tinycnn", 32, 4, 192),
        ("resnet18", 64, 4, 512),
        ("vit_tiny_patch16_224", 32, 5, 192),
        ("vit_small_patch16_224", 32, 5, 384),
    ],
)
def test_image_encoder_tokens(name, size, n_tokens, dim):
    encoder = ImageEncoder(name, img_size=size).eval()
    tokens = encoder(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, n_tokens, dim)
    assert encoder.num_features == dim
    assert torch.allclose(encoder.pool(tokens), tokens.mean(1))


def test_tiny_cnn_is_small():
    n_params = sum(p.numel() for p in ImageEncoder("sth_tinycnn").parameters())
    assert 2e5 < n_params < 5e5


def test_tiny_cnn_folds_its_batch_norms_in_eval_mode():
    from st_from_he.models import TinyCNN

    torch.manual_seed(0)
    cnn = TinyCNN()
    for norm in cnn.modules():  # statistics and affine parameters far from the identity, as after training
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.2, 3.0)
            norm.weight.data.normal_()
            norm.bias.data.normal_()
    images = torch.randn(6, 3, 64, 64)
    cnn.eval()
    with torch.no_grad():
        reference = cnn.features(images)  # the unfolded layers
        folded = cnn.forward_features(images)
    assert folded.shape == reference.shape == (6, 192, 4, 4)
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    cnn.train()  # training mode keeps the batch-statistics layers (their gradients and running-statistics updates)
    before = cnn.features[1].running_mean.clone()
    cnn.forward_features(images)
    assert not torch.equal(cnn.features[1].running_mean, before)


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="Unknown encoder"):
        ImageEncoder("not_a_model")


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["sth_tinycnn", "vit_tiny_patch16_224"])
def test_weights_from_safetensors(tmp_path, name):
    torch.manual_seed(0)
    source = ImageEncoder(name, img_size=IMG)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)  # keys carry a "model." prefix
    torch.manual_seed(1)
    first = next(iter(source.state_dict()))
    assert not torch.equal(ImageEncoder(name, img_size=IMG).state_dict()[first], source.state_dict()[first])
    loaded = ImageEncoder(name, weights=path, img_size=IMG)
    _assert_same_parameters(source, loaded)


def test_weights_from_wrapped_pth(tmp_path):
    torch.manual_seed(0)
    source = ImageEncoder("resnet18")
    path = tmp_path / "encoder.pth"
    # A DDP-style checkpoint: wrapper dict, "module." prefix and a classifier the encoder does not have.
    state = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 512)
    torch.save({"state_dict": state, "epoch": 3}, path)
    torch.manual_seed(1)
    loaded = ImageEncoder("resnet18", weights=str(path))
    _assert_same_parameters(source, loaded)


def test_weights_resample_vit_position_embedding(tmp_path):
    source = ImageEncoder("vit_tiny_patch16_224", img_size=32)
    path = tmp_path / "vit.pt"
    torch.save(source.model.state_dict(), path)
    loaded = ImageEncoder("vit_tiny_patch16_224", weights=path, img_size=48)
    assert loaded.model.pos_embed.shape == (1, 1 + 9, 192)
    assert torch.equal(loaded.model.pos_embed[:, 0], source.model.pos_embed[:, 0])  # class token kept as is
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)


def test_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.safetensors"):
        ImageEncoder("sth_tinycnn", weights=tmp_path / "missing.safetensors")
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match="No tensor .*unrelated.safetensors"):
        ImageEncoder("sth_tinycnn", weights=unrelated)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        ImageEncoder("sth_tinycnn", weights=corrupt)


def test_hub_weights_offline_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="offline"):
        ImageEncoder("vit_tiny_patch16_224", weights="hf-hub:st-from-he/no-such-repo", img_size=IMG)


# -- heads --------------------------------------------------------------------------------------------------------


def test_projection_head_formula():
    head = ProjectionHead(10, 16, dropout=0.1).eval()
    x = torch.randn(5, 10)
    p = x @ head.projection.weight.T + head.projection.bias
    h = F.gelu(p) @ head.fc.weight.T + head.fc.bias
    expected = F.layer_norm(p + h, (16,), head.layer_norm.weight, head.layer_norm.bias)
    out = head(x)
    assert out.shape == (5, 16)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.mean(-1), torch.zeros(5), atol=1e-5)  # LayerNorm output at init


def test_gene_encoder_snn_and_regression_shapes():
    expression = torch.rand(6, N_GENES)
    assert GeneEncoder(N_GENES, 32)(expression).shape == (6, 32)
    snn = SNNGeneTokens(N_GENES, n_tokens=8, dim=32, dropout=0.25)
    assert isinstance(snn.net[1], torch.nn.ELU) and isinstance(snn.net[2], torch.nn.AlphaDropout)
    assert snn(expression).shape == (6, 8, 32)
    snn.eval()
    assert torch.equal(snn(expression), snn(expression))
    assert RegressionHead(32, N_GENES)(torch.randn(6, 32)).shape == (6, N_GENES)
    assert RegressionHead(32, N_GENES, hidden=16)(torch.randn(6, 32)).shape == (6, N_GENES)


# -- fusion -------------------------------------------------------------------------------------------------------


def test_fusion_masks_about_half_in_training_only():
    torch.manual_seed(0)
    fusion = MaskedCrossModalFusion(24, 32, n_heads=4, n_blocks=2, mask_ratio=0.5)
    tokens = torch.randn(4, 50, 32)
    masked, mask = fusion.random_mask(tokens)
    assert abs(mask.float().mean().item() - 0.5) < 0.02
    assert torch.all(masked[mask] == 0) and torch.equal(masked[~mask], tokens[~mask])
    fusion.eval()
    unmasked, mask = fusion.random_mask(tokens)
    assert not mask.any() and torch.equal(unmasked, tokens)


def test_fusion_output_shape_and_eval_determinism():
    fusion = MaskedCrossModalFusion(24, 32, n_heads=4, n_blocks=2)
    assert len(fusion.blocks) == 2
    image_tokens, gene_tokens = torch.randn(3, 7, 24), torch.randn(3, 4, 32)
    assert fusion(image_tokens, gene_tokens).shape == (3, 32)
    fusion.eval()
    assert torch.equal(fusion(image_tokens, gene_tokens), fusion(image_tokens, gene_tokens))


# -- context ------------------------------------------------------------------------------------------------------


def test_multiscale_fusion():
    x = torch.randn(4, 1, 16)
    assert torch.equal(MultiScaleFusion(16, 1)(x), x[:, 0])
    fusion = MultiScaleFusion(16, 3)
    x3 = torch.randn(4, 3, 16)
    assert torch.equal(fusion(x3), x3[:, 0])  # zero-initialised mix: starts as the single-scale model
    torch.nn.init.normal_(fusion.mix.weight)
    assert fusion(x3).shape == (4, 16) and not torch.equal(fusion(x3), x3[:, 0])
    with pytest.raises(ValueError, match="3 scales"):
        fusion(x)


def test_neighbour_attention_padding_and_identity():
    attention = NeighbourAttention(16, n_heads=4).eval()
    x, neighbours = torch.randn(2, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[False, False, True, True, True], [False] * 5])
    out = attention(x, neighbours, mask)
    assert out.shape == (2, 16)
    changed = neighbours.clone()
    changed[0, 2:] = 100.0  # padded slots must not matter
    out_changed = attention(x, changed, mask)
    assert torch.allclose(out[0], out_changed[0], atol=1e-6)
    assert torch.equal(attention(x, torch.empty(2, 0, 16)), x)
    all_padded = attention(x, neighbours, torch.ones(2, 5, dtype=torch.bool))
    assert torch.isfinite(all_padded).all()


# -- losses -------------------------------------------------------------------------------------------------------


def test_soft_contrastive_loss_matches_hand_computation():
    image = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    gene = [[0.8, 0.2], [0.1, 0.9], [0.3, 0.6]]
    tau = 0.5

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    n = 3
    logits = [[dot(gene[i], image[j]) / tau for j in range(n)] for i in range(n)]
    sim = [[(dot(image[i], image[j]) + dot(gene[i], gene[j])) / 2 * tau for j in range(n)] for i in range(n)]
    targets = [[math.exp(s) / sum(math.exp(t) for t in row) for s in row] for row in sim]

    def cross_entropy(rows, target_rows):
        total = 0.0
        for row, target in zip(rows, target_rows, strict=True):
            log_z = math.log(sum(math.exp(v) for v in row))
            total += -sum(t * (v - log_z) for t, v in zip(target, row, strict=True))
        return total / len(rows)

    def transpose(m):
        return [list(c) for c in zip(*m, strict=True)]

    expected = (cross_entropy(logits, targets) + cross_entropy(transpose(logits), transpose(targets))) / 2
    loss = soft_contrastive_loss(torch.tensor(image), torch.tensor(gene), tau=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_contrastive_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    image = F.layer_norm(torch.randn(16, 32), (32,))
    gene = image + 0.1 * torch.randn(16, 32)
    shuffled = gene[torch.roll(torch.arange(16), 1)]
    assert soft_contrastive_loss(image, gene) < soft_contrastive_loss(image, shuffled)


def test_reconstruction_and_combined_losses():
    prediction = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    loss = reconstruction_loss(prediction, target)
    assert loss.item() == pytest.approx(((prediction - target) ** 2).mean().item())
    loss.backward()
    assert prediction.grad is not None and target.grad is None  # gradient stopped at the target
    total = combine_losses({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}, {"b": 0.5})
    assert total.item() == pytest.approx(math.log(2) + 0.5 * math.log(4))


# -- augmentation -------------------------------------------------------------------------------------------------


def test_reference_augmentation_is_a_symmetry_shared_across_scales():
    torch.manual_seed(0)
    spot = torch.randn(16, 1, 3, 8, 8)
    images = torch.cat([spot, spot], dim=1)  # two identical "scales"
    out = BatchAugment()(images)
    assert out.shape == images.shape
    assert torch.equal(out[:, 0], out[:, 1])  # same draw for all scales of a spot
    symmetries = []
    for k in range(4):
        rotated = torch.rot90(spot[:, 0], k, dims=(-2, -1))
        symmetries += [rotated, rotated.flip(-1)]
    for i in range(16):
        assert any(torch.equal(out[i, 0], s[i]) for s in symmetries)
    assert not all(torch.equal(out[i, 0], spot[i, 0]) for i in range(16))


def test_optional_augmentations():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = torch.rand(4, 2, 3, 16, 16) * 0.8 + 0.1
    images = (rgb - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    off = BatchAugment(flips=False, rot90=False)
    assert torch.equal(off(images), images)
    for kwargs in ({"color": 0.2}, {"stain": 0.05}, {"rescale": 0.3}):
        out = BatchAugment(flips=False, rot90=False, **kwargs)(images)
        assert out.shape == images.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, images, atol=1e-3)
        back = out * std.view(3, 1, 1) + mean.view(3, 1, 1)
        assert back.min() > -1e-4 and back.max() < 1 + 1e-4  # stays a valid RGB image
    # The blur keeps each image's mean (area average, then interpolation) and is given to about half the samples.
    many = images.repeat(16, 1, 1, 1, 1)
    blurred = BatchAugment(flips=False, rot90=False, lowres=4.0)(many)
    changed = (blurred - many).abs().flatten(1).amax(1) > 1e-4
    assert 16 < changed.sum() < 48
    assert torch.allclose(blurred.mean((-2, -1)), many.mean((-2, -1)), atol=0.15)  # 16 px: border effects
    # A tiny stain jitter is nearly the identity: the RGB -> HED -> RGB round trip is exact.
    near = BatchAugment(flips=False, rot90=False, stain=1e-6)(images)
    assert torch.allclose(near, images, atol=1e-3)


def test_lower_resolution_removes_detail_above_the_factor():
    torch.manual_seed(0)
    images = torch.rand(3, 2, 3, 32, 32)
    out = lower_resolution(images, torch.tensor([1.0, 2.0, 8.0]))
    assert out.shape == images.shape and torch.equal(out[0], images[0])  # factor 1: untouched
    # a 2x coarser scan keeps more of the pixel-level variance than an 8x coarser one
    detail = [(out[i] - out[i].mean((-2, -1), keepdim=True)).std().item() for i in range(3)]
    assert detail[0] > detail[1] > detail[2]
    # both scales of a sample share the factor: identical inputs stay identical
    same = lower_resolution(images[:, :1].repeat(1, 2, 1, 1, 1), torch.tensor([1.0, 3.0, 5.0]))
    assert torch.equal(same[:, 0], same[:, 1])


# -- retrieval ----------------------------------------------------------------------------------------------------


def test_retrieve_returns_mean_of_top_k():
    angles = torch.tensor([0.0, 0.3, 0.6, 1.2, 2.0, 3.0])
    bank = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.arange(1, 7)[:, None]  # norms must not matter
    expression = torch.arange(18, dtype=torch.float32).view(6, 3)
    query = torch.tensor([[2.0, 0.0], [math.cos(2.1), math.sin(2.1)]])
    out = retrieve(query, bank, expression, k=2, batch_size=1)
    assert torch.equal(out[0], expression[[0, 1]].mean(0))
    assert torch.equal(out[1], expression[[4, 3]].mean(0))
    assert torch.allclose(retrieve(query, bank, expression, k=100), expression.mean(0).expand(2, 3))


def test_retrieve_equals_the_mean_of_the_gathered_rows():
    torch.manual_seed(1)
    query, bank, expression = torch.randn(70, 16), torch.randn(300, 16), torch.rand(300, 400) * 5
    out = retrieve(query, bank, expression, k=50)
    nearest = (F.normalize(query, dim=-1) @ F.normalize(bank, dim=-1).T).topk(50, dim=-1).indices
    torch.testing.assert_close(out, expression[nearest].mean(1), rtol=1e-6, atol=1e-6)


def test_retrieve_chunking_matches_single_pass():
    torch.manual_seed(0)
    query, bank, expression = torch.randn(37, 8), torch.randn(50, 8), torch.rand(50, 5)
    assert torch.equal(retrieve(query, bank, expression, k=5, batch_size=4), retrieve(query, bank, expression, k=5))


# -- lightning module ---------------------------------------------------------------------------------------------


def test_module_shapes_with_all_extensions():
    torch.manual_seed(0)
    config = tiny_config(context_scales=(1.0, 3.0), neighbour_attention=True, regression_head=True)
    module = ExpressionModule(config, N_GENES).eval()
    batch = random_batch(4, scales=2)
    batch["neighbours"] = torch.randn(4, 3, 2, 3, IMG, IMG)
    batch["neighbour_mask"] = torch.tensor([[False, False, True]] * 4)
    emb = module.embed_images(batch)
    assert emb.shape == (4, 32)
    assert module.embed_expression(batch["expression"]).shape == (4, 32)
    assert module.predict_regression(batch).shape == (4, N_GENES)
    assert set(module.compute_losses(batch)) == {"contrastive", "reconstruction", "regression", "loss"}
    # Precomputed neighbour features give the same embedding as neighbour images.
    features = module.encode_features(batch["neighbours"].flatten(0, 1)).view(4, 3, -1)
    assert features.shape == (4, 3, 192)
    alt = {k: v for k, v in batch.items() if k != "neighbours"} | {"neighbour_features": features}
    assert torch.allclose(module.embed_images(alt), emb, atol=1e-5)
    assert not torch.allclose(module.embed_images(batch["image"]), emb)  # neighbours matter


def test_module_without_optional_parts():
    module = ExpressionModule(tiny_config(contrastive=False, use_reconstruction=False, regression_head=True), N_GENES)
    assert module.gene_encoder is None and module.fusion is None
    assert set(module.compute_losses(random_batch(4))) == {"regression", "loss"}
    with pytest.raises(RuntimeError, match="gene encoder"):
        module.embed_expression(torch.rand(2, N_GENES))
    with pytest.raises(RuntimeError, match="regression head"):
        ExpressionModule(tiny_config(), N_GENES).predict_regression(random_batch(2))


def _fit(config: ModelConfig, batches: list[dict], max_steps: int, seed: int = 0) -> ExpressionModule:
    L.seed_everything(seed, verbose=False)
    module = ExpressionModule(config, N_GENES)
    samples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["expression"]))]
    loader = torch.utils.data.DataLoader(samples, batch_size=len(batches[0]["expression"]), shuffle=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, loader)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_decreases_loss():
    config = tiny_config(lr=3e-3, regression_head=True)
    batch = random_batch(16)
    torch.manual_seed(0)
    reference = ExpressionModule(config, N_GENES).eval()
    with torch.no_grad():
        before = reference.compute_losses(batch)
    module = _fit(config, [batch], max_steps=25).eval()
    with torch.no_grad():
        after = module.compute_losses(batch)
    assert after["loss"] < 0.8 * before["loss"]
    assert after["regression"] < before["regression"]
    assert module.trainer.logged_metrics.keys() >= {"train_loss", "train_contrastive", "val_loss", "val_regression"}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_is_deterministic():
    config = tiny_config(augment_color=0.1, augment_rescale=0.2)
    batches = [random_batch(8, seed=1), random_batch(8, seed=2)]
    a = _fit(config, batches, max_steps=4)
    b = _fit(config, batches, max_steps=4)
    _assert_same_parameters(a, b)
    c = _fit(config, batches, max_steps=4, seed=1)
    assert not np.allclose(a.image_head.fc.weight.detach().numpy(), c.image_head.fc.weight.detach().numpy())
