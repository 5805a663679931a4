"""fusednorm.convert on real diffusers models built from small configs (no download): every
GroupNorm -> SiLU of the ResNet blocks and the output head becomes one GroupNormAct."""
import copy
import pickle

import pytest
import torch
from torch.testing import assert_close

from fusednorm import GroupNormAct, convert
from test_convert import assert_same_gradients

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install "
                                                     "diffusers; .ci/run installs it)")
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from fusednorm.integrations.diffusers import FusedResnetBlock2D  # noqa: E402


def randomize_norms(model, seed=0):
    """Non-trivial GN affine parameters (diffusers initializes them to 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model


def unet_2d():
    torch.manual_seed(0)
    return randomize_norms(UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 48), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def unet_2d_condition():
    torch.manual_seed(0)
    return randomize_norms(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))


def group_norms(model):
    return sum(type(m) is torch.nn.GroupNorm for m in model.modules())


CASES = {
    "UNet2DModel": (unet_2d, lambda: (torch.randn(2, 3, 16, 16), torch.tensor([10, 700]))),
    "UNet2DConditionModel": (unet_2d_condition, lambda: (
        torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.randn(2, 5, 16))),
}


@pytest.mark.parametrize("case", CASES)
def test_unet_every_resnet_norm_and_the_output_norm_fused(case):
    build, inputs = CASES[case]
    model = build()
    state = copy.deepcopy(model.state_dict())
    resnets = [n for n, m in model.named_modules() if type(m) is ResnetBlock2D]
    attentions = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"
                  and getattr(m, "group_norm", None) is not None]
    transformer_norms = [f"{n}.norm" for n, m in model.named_modules()
                         if type(m).__name__ == "Transformer2DModel"]

    converted, report = convert(model)

    expected_fused = sorted([f"{r}.{n}" for r in resnets for n in ("norm1", "norm2")]
                            + ["conv_norm_out"])
    assert sorted(r.name for r in report.replaced) == expected_fused
    assert all(isinstance(converted.get_submodule(n), GroupNormAct) for n in expected_fused)
    assert {r.absorbed for r in report.replaced} == (
        {f"{r}.nonlinearity" for r in resnets} | {"conv_act"})
    assert all(type(converted.get_submodule(r)) is FusedResnetBlock2D for r in resnets)
    # Left, with why: attention's and the transformers' GroupNorms feed no activation.
    left = {e.name: e.reason for e in report.left}
    assert sorted(left) == sorted([f"{a}.group_norm" for a in attentions] + transformer_norms)
    assert all("not fx-traceable" in reason and "no rule" in reason for reason in left.values())
    assert group_norms(converted) == len(left)
    # The input model is unchanged, and the state dicts are interchangeable.
    assert group_norms(model) == len(expected_fused) + len(left)
    assert all(type(model.get_submodule(r)) is ResnetBlock2D for r in resnets)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert converted.state_dict().keys() == state.keys()
    copy.deepcopy(model).load_state_dict(converted.state_dict())

    args = inputs()
    for mode in ("train", "eval"):
        model.train(mode == "train"), converted.train(mode == "train")
        assert_close(converted(*args).sample, model(*args).sample,
                     msg=lambda m, mode=mode: f"{case} {mode}: {m}")
    model.train(), converted.train()
    sample, *rest = args
    assert_same_gradients(model.double(), converted.double(), sample.double(),
                          *(t.double() if t.is_floating_point() else t for t in rest),
                          output=lambda out: out.sample)
    pickle.loads(pickle.dumps(converted))  # FusedResnetBlock2D is importable


def test_scale_shift_resnet_block_fuses_norm1_only():
    torch.manual_seed(0)
    block = randomize_norms(ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=12,
                                          groups=4, time_embedding_norm="scale_shift"))
    converted, report = convert(block)
    assert type(converted) is FusedResnetBlock2D
    assert [r.name for r in report.replaced] == ["norm1"]
    assert [(e.name, e.reason) for e in report.left] == [
        ("norm2", "the scale-shift time embedding sits between norm2 and the activation")]
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 12)
    assert_close(converted(x, temb), block(x, temb))
    assert_same_gradients(block.double(), converted.double(), x.double(), temb.double())


@pytest.mark.parametrize("options", [dict(up=True, skip_time_act=True), dict(down=True),
                                     dict(temb_channels=None, output_scale_factor=2.0)])
def test_resnet_block_variants(options):
    torch.manual_seed(0)
    temb_channels = options.pop("temb_channels", 12)
    block = randomize_norms(ResnetBlock2D(in_channels=16, out_channels=16, groups=4,
                                          temb_channels=temb_channels, **options))
    converted, report = convert(block)
    assert [r.name for r in report.replaced] == ["norm1", "norm2"] and report.left == []
    x = torch.randn(2, 16, 6, 6)
    temb = torch.randn(2, 12) if temb_channels else None
    assert_close(converted(x, temb), block(x, temb))


def test_vae_encoder_and_decoder_output_norms_fused():
    torch.manual_seed(0)
    vae = randomize_norms(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8))
    converted, report = convert(vae)
    fused = {r.name for r in report.replaced}
    assert {"encoder.conv_norm_out", "decoder.conv_norm_out"} <= fused
    assert len(fused) == group_norms(vae) - len(report.left)
    x = torch.randn(1, 3, 16, 16)
    assert_close(converted(x, sample_posterior=False).sample, vae(x, sample_posterior=False).sample)
