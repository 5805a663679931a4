"""Conversion rules for diffusers' UNet and VAE blocks (written against diffusers 0.42).

diffusers' blocks apply ``norm -> activation`` inside ``forward`` with one activation module that
is also applied elsewhere (ResnetBlock2D's ``nonlinearity`` also acts on the time embedding), and
their forwards do not trace with torch.fx, so fusing needs to know each block.
"""
from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

_RESNET_ATTRIBUTES = ("norm1", "norm2", "nonlinearity", "conv1", "conv2", "dropout",
                      "time_emb_proj", "skip_time_act", "time_embedding_norm", "upsample",
                      "downsample", "conv_shortcut", "output_scale_factor")


class FusedResnetBlock2D(ResnetBlock2D):
    """A ResnetBlock2D whose ``norm1`` (and ``norm2`` unless a scale-shift time embedding sits
    between it and the activation) apply the activation themselves: the forward of diffusers'
    ResnetBlock2D without ``nonlinearity`` after a fused norm. Same parameters and state dict."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs):
        hidden_states = self.norm1(input_tensor)  # fused: norm1 + nonlinearity
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(" `temb` should not be None when `time_embedding_norm` is "
                                 f"{self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
            hidden_states = self.nonlinearity(hidden_states)
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)  # fused: norm2 + nonlinearity
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


def resnet_block_2d_rule(block, context):
    """ResnetBlock2D -> FusedResnetBlock2D: norm1 (and norm2 unless ``time_embedding_norm`` is
    "scale_shift") fused with ``nonlinearity``, which stays for the time embedding."""
    missing = [a for a in _RESNET_ATTRIBUTES if not hasattr(block, a)]
    if type(block) is not ResnetBlock2D or missing:
        reason = (f"attributes {missing} missing (a diffusers version this rule does not know)"
                  if missing else f"{type(block).__name__} is a subclass the rule does not know")
        for name in ("norm1", "norm2"):
            if isinstance(getattr(block, name, None), nn.GroupNorm):
                setattr(block, name, context.leave(getattr(block, name), name, reason))
        return block
    if context.activation_of(block.nonlinearity) is None:
        reason = f"activation {type(block.nonlinearity).__name__} is not one fusednorm has"
        block.norm1 = context.leave(block.norm1, "norm1", reason)
        block.norm2 = context.leave(block.norm2, "norm2", reason)
        return block
    block.norm1 = context.fuse(block.norm1, "norm1", block.nonlinearity, absorbed="nonlinearity")
    if block.time_embedding_norm == "scale_shift":
        block.norm2 = context.leave(block.norm2, "norm2",
                                    "the scale-shift time embedding sits between norm2 and the "
                                    "activation")
    else:
        block.norm2 = context.fuse(block.norm2, "norm2", block.nonlinearity,
                                   absorbed="nonlinearity")
    block.__class__ = FusedResnetBlock2D
    return block


def conv_norm_out_rule(model, context):
    """UNet2DModel, UNet2DConditionModel, VAE Encoder/Decoder: ``conv_norm_out`` fused with
    ``conv_act`` (their forwards apply ``conv_act`` right after ``conv_norm_out`` and nowhere
    else), ``conv_act`` becomes nn.Identity. A SpatialNorm or a missing ``conv_norm_out`` (the
    UNet built without one) is left alone; the rest of the model is converted as usual."""
    norm, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if not isinstance(norm, nn.GroupNorm) or type(norm).forward is not nn.GroupNorm.forward:
        return model
    if act is None or context.activation_of(act) is None:
        model.conv_norm_out = context.leave(
            norm, "conv_norm_out", f"followed by {type(act).__name__}, not an activation "
                                   f"fusednorm has")
        return model
    model.conv_norm_out = context.fuse(norm, "conv_norm_out", act, absorbed="conv_act")
    model.conv_act = nn.Identity()
    return model
