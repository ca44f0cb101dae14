"""preset="cmrc" against the authors' code (github ngfufdrdh/CMRCNet): architecture, losses, masking, schedule."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import st_from_he as sth
from st_from_he.models import ExpressionModule, MaskedCrossModalFusion, ModelConfig, soft_contrastive_loss
from st_from_he.models._fusion import GeneCrossAttention
from st_from_he.tl._presets import NEURAL_PRESETS

# A small version of the authors' architecture: their ViT cut to one 64-d block on 64 px patches.
TINY = {"img_size": 64, "encoder_kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2}, "batch_size": 8}


def _config(**overrides) -> ModelConfig:
    return ModelConfig(**(NEURAL_PRESETS["cmrc"] | TINY | overrides))


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def test_preset_holds_the_authors_values_and_default_keeps_its_own():
    cmrc = ModelConfig(**NEURAL_PRESETS["cmrc"])
    assert (cmrc.encoder, cmrc.fusion, cmrc.cross_heads, cmrc.cross_dropout) == ("vit_b32_cmrc", "cmrc", 4, 0.0)
    assert (cmrc.n_heads, cmrc.fusion_dropout, cmrc.block_cross_dropout, cmrc.n_fusion_blocks) == (8, 0.1, 0.25, 2)
    assert not cmrc.recon_stop_grad and cmrc.contrastive_log == "per_sample" and cmrc.mask_in_validation
    assert (cmrc.lr_schedule, cmrc.t_max, cmrc.eta_min, cmrc.max_epochs) == ("epoch_cosine", 60, 1e-5, 60)
    assert (cmrc.val_fraction, cmrc.val_per_section, cmrc.patience) == (0.2, True, None)
    assert (cmrc.lr, cmrc.weight_decay, cmrc.batch_size, cmrc.top_k, cmrc.mask_ratio) == (1e-4, 1e-3, 64, 50, 0.5)
    assert cmrc.target_sum == "median" and ModelConfig(**NEURAL_PRESETS["default"]).target_sum == 1e4
    default = ModelConfig(**NEURAL_PRESETS["default"])
    assert default.fusion == "stacked" and default.recon_stop_grad and default.contrastive_log == "batch"
    assert (default.lr_schedule, default.val_fraction, default.patience) == ("step_cosine", 0.1, 5)
    assert not default.mask_in_validation and not default.val_per_section


def test_full_preset_has_the_authors_parameter_count():
    """Every part of the full-size model has as many parameters as the authors' (their unused classifier aside)."""
    n_genes, d, p = 3467, 768, 256
    module = ExpressionModule(ModelConfig(**NEURAL_PRESETS["cmrc"]), n_genes=n_genes)
    vit_block = 4 * d + _linear(d, 3 * d) + _linear(d, d) + _linear(d, 4 * d) + _linear(4 * d, d)
    vit = 3 * 32 * 32 * d + d + d + 50 * d + 8 * vit_block + 2 * d  # patch conv, cls token, pos-embed, blocks, norm
    fusion_block = 4 * p + _linear(p, 3 * p) + _linear(p, p) + _linear(p, 4 * p) + _linear(4 * p, p) + 4 * _linear(p, p)
    fusion = _linear(d, p) + _linear(p, 3 * p) + _linear(p, p) + fusion_block  # 768->256, first attention, ONE block
    projection = _linear(d, p) + _linear(p, p) + 2 * p
    expected = {
        "encoder": vit,
        "image_head": projection,
        "gene_encoder": _linear(n_genes, p) + _linear(p, p) + 2 * p,
        "gene_tokens": _linear(n_genes, 8 * p),
        "fusion": fusion,
    }
    counts = {name: sum(q.numel() for q in child.parameters()) for name, child in module.named_children()}
    assert {name: counts[name] for name in expected} == expected
    # the authors' model: 69,705,448 parameters, 769,000 of them in a classifier head it never uses
    assert sum(q.numel() for q in module.parameters()) == 69_705_448 - 769_000
    assert module.encoder(torch.zeros(1, 3, 224, 224)).shape == (1, 50, 768)


def test_one_tied_fusion_block_applied_twice_and_gene_tokens_never_updated():
    torch.manual_seed(0)
    fusion = MaskedCrossModalFusion(64, 32, n_heads=4, n_blocks=2, style="cmrc", cross_heads=4, cross_dropout=0.0)
    assert not any(".1." in name or "blocks" in name for name, _ in fusion.named_parameters())
    seen = []
    fusion.block.register_forward_pre_hook(lambda module, args: seen.append(args))
    genes = torch.randn(3, 8, 32)
    fusion(torch.randn(3, 5, 64), genes)
    assert len(seen) == 2 and all(args[1] is genes for args in seen)  # the same gene tokens enter both passes
    # the second pass reads the first pass's image tokens
    assert seen[1][0].shape == (3, 5, 32) and not torch.equal(seen[0][0], seen[1][0])


def test_first_cross_attention_output_has_no_residual_and_no_norm():
    torch.manual_seed(0)
    fusion = MaskedCrossModalFusion(64, 32, n_heads=4, n_blocks=2, style="cmrc", cross_heads=4, cross_dropout=0.0)
    fusion.eval()  # no masking, no dropout
    assert fusion.cross_attention.num_heads == 4 and fusion.cross_attention.dropout == 0.0
    assert not hasattr(fusion, "cross_norm")
    images, genes = torch.randn(3, 5, 64), torch.randn(3, 8, 32)
    with torch.no_grad():
        tokens = fusion.image_proj(images)
        attended = fusion.cross_attention(tokens, genes, genes)[0]
        by_hand = fusion.block(fusion.block(attended, genes), genes).mean(dim=1)
        with_residual = fusion.block(fusion.block(tokens + attended, genes), genes).mean(dim=1)
        out = fusion(images, genes)
    torch.testing.assert_close(out, by_hand)
    assert not torch.allclose(out, with_residual, atol=1e-3)


def test_gene_cross_attention_is_v1_plus_attention_times_v2():
    torch.manual_seed(0)
    attention = GeneCrossAttention(16, n_heads=2, dropout=0.25).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        q, k = attention.query(x), attention.key(y)
        assert (q >= 0).all() and (k >= 0).all()  # Linear + ReLU
        v1, v2 = attention.value_image(q), attention.value_gene(k)
        heads = []
        for h in range(2):
            part = slice(8 * h, 8 * (h + 1))
            a = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(8), dim=-1)
            heads.append(v1[..., part] + a @ v2[..., part])
        torch.testing.assert_close(attention(x, y), torch.cat(heads, dim=-1))


def test_per_sample_log_loss_equals_hand_computation():
    torch.manual_seed(0)
    module = ExpressionModule(_config(use_reconstruction=False), n_genes=12).eval()
    batch = {"image": torch.randn(6, 3, 64, 64), "expression": torch.rand(6, 12) * 3}
    with torch.no_grad():
        image, gene = module.embed_images(batch["image"]), module.gene_encoder(batch["expression"])
        logits = gene @ image.T
        targets = F.softmax((image @ image.T + gene @ gene.T) / 2, dim=-1)
        per_spot = (
            -(targets * F.log_softmax(logits, -1)).sum(1) - (targets.T * F.log_softmax(logits.T, -1)).sum(1)
        ) / 2
        losses = module.compute_losses(batch)
    torch.testing.assert_close(soft_contrastive_loss(image, gene, reduction="none"), per_spot)
    torch.testing.assert_close(losses["loss"], torch.log1p(per_spot).mean())
    torch.testing.assert_close(losses["contrastive"], per_spot.mean())
    assert not torch.isclose(losses["loss"], torch.log1p(per_spot.mean()))  # the package's batch-level log differs
    batch_level = ExpressionModule(_config(use_reconstruction=False, contrastive_log="batch"), n_genes=12).eval()
    batch_level.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(batch_level.compute_losses(batch)["loss"], torch.log1p(per_spot.mean()))


def test_reconstruction_target_keeps_its_gradient():
    torch.manual_seed(0)
    batch = {"image": torch.randn(4, 3, 64, 64), "expression": torch.rand(4, 12)}
    grads = {}
    for stop in (False, True):
        torch.manual_seed(1)
        module = ExpressionModule(_config(contrastive=False, regression_head=True, recon_stop_grad=stop), 12)
        module.compute_losses(batch)["reconstruction"].backward()
        grads[stop] = module.image_head.projection.weight.grad
    assert grads[True] is None  # stopped: the image head learns nothing from the reconstruction
    assert grads[False] is not None and grads[False].abs().sum() > 0


def test_masking_is_active_in_validation():
    torch.manual_seed(0)
    module = ExpressionModule(_config(), n_genes=12).eval()
    assert module.fusion.mask_in_eval
    masked, mask = module.fusion.random_mask(torch.ones(8, 50, 256))
    assert 0.45 < mask.float().mean() < 0.55 and torch.equal(masked == 0, mask)
    batch = {"image": torch.randn(4, 3, 64, 64), "expression": torch.rand(4, 12)}
    with torch.no_grad():
        first, second = (module.validation_step(batch, 0) for _ in range(2))
    assert not torch.isclose(first, second)  # a fresh random mask in each validation pass
    plain = ExpressionModule(_config(mask_in_validation=False), n_genes=12).eval()
    assert not plain.fusion.random_mask(torch.ones(2, 3, 256))[1].any()


def test_learning_rate_per_epoch_follows_the_authors_scheduler():
    module = ExpressionModule(_config(), n_genes=12)
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "epoch"
    # the authors: CosineAnnealingLR(T_max=60, eta_min=1e-5), stepped once at the start of every epoch
    theirs_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=1e-3)
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(theirs_opt, T_max=60, eta_min=1e-5)
    ours = []
    for _ in range(60):
        theirs.step()
        ours.append(optimizer.param_groups[0]["lr"])
        assert ours[-1] == pytest.approx(theirs.get_last_lr()[0], rel=1e-9)
        scheduler.step()
    assert ours[0] == pytest.approx(1e-5 + 0.9e-4 * (1 + math.cos(math.pi / 60)) / 2)
    assert ours[-1] == pytest.approx(1e-5) and all(a > b for a, b in zip(ours, ours[1:], strict=False))


def test_cmrc_fit_keeps_a_fifth_of_each_section_and_trains_every_epoch(her2st_small):
    train = sth.pp.split_sections(her2st_small, test=["C6"])[0]
    genes = sth.pp.select_genes(train, n_top=20)
    spots = list(train.tables["table"].obs_names[:60])
    model = sth.tl.ExpressionModel(genes, preset="cmrc", **TINY, max_epochs=3)
    model.fit(train, spots=spots, progress_bar=False)
    assert model.training_info["n_val_spots"] == 12 and model.training_info["n_train_spots"] == 48
    assert list(model.history["epoch"]) == [0, 1, 2]


def test_per_section_split_takes_the_fraction_from_every_section():
    from st_from_he._sdata import SAMPLE_KEY
    from st_from_he.tl._data import SpotArrays
    from st_from_he.tl._model import _split

    sections = np.repeat(["A", "B", "C"], [50, 30, 20])
    obs = pd.DataFrame({SAMPLE_KEY: sections}, index=[f"s{i}" for i in range(100)])
    data = SpotArrays(np.zeros((100, 1, 3, 2, 2), np.uint8), obs, np.zeros((100, 3), np.float32))
    train, val = _split(data, 0.2, None, seed=0, per_section=True)
    assert sorted(np.concatenate([train, val])) == list(range(100))
    assert [int((sections[val] == s).sum()) for s in "ABC"] == [10, 6, 4]


def test_median_targets_are_scanpys_normalize_total_per_section(her2st_small):
    """The authors' targets: ``sc.pp.normalize_total`` (each section's median total) then ``sc.pp.log1p``."""
    import scanpy as sc

    from st_from_he.tl._data import measured_targets

    table = her2st_small.tables["table"]
    genes = list(table.var_names[:50])
    ours = measured_targets(table, genes, target_sum="median")
    for section in ("C5", "C6"):
        adata = table[table.obs["sample"] == section].copy()
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
        rows = (table.obs["sample"] == section).to_numpy()
        np.testing.assert_allclose(ours[rows], adata[:, genes].X.toarray(), rtol=1e-5, atol=1e-6)
    # C5 and C6 have different medians: one number for both would not give this
    cp10k = measured_targets(table, genes)
    assert not np.allclose(ours, cp10k)
    model = sth.tl.ExpressionModel(genes, preset="cmrc")
    assert model.target_sum == "median" and "median" in model.units
    assert sth.tl.ExpressionModel(genes).units == "log1p(counts per 10,000)"
    with pytest.raises(ValueError, match="`target_sum` must be a positive number"):
        sth.tl.ExpressionModel(genes, target_sum="mean")
