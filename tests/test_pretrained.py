"""Backbone weights from other models' files: AdaFace's IR layout mapped exactly, arcface_torch and
Lightning checkpoints, skipped layers, and clear errors for files that do not fit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TinyNet
from torch import nn

import facecore
from facecore.core.checkpoint import load_checkpoint, save_checkpoint
from facecore.core.pretrained import adaface_to_iresnet, backbone_weights, load_pretrained
from facecore.errors import CheckpointError, ConfigError

WIDTHS = (64, 128, 256, 512)


class AdaFaceBlock(nn.Module):
    """AdaFace's BasicBlockIR as its repository describes it: ``res_layer`` = BN, conv3x3, BN, PReLU,
    conv3x3 with the stride, BN; ``shortcut_layer`` = a strided identity (MaxPool2d with a 1x1 window)
    when the width stays, else conv1x1 with the stride + BN; no activation after the sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cin == cout:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.res_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                                       nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """A reference of AdaFace's IR network (net.Backbone, 112x112, IR mode), written from its published
    description: BGR input in [-1, 1]; ``input_layer`` conv3x3-BN-PReLU; a flat ``body`` of blocks whose
    first block per stage has stride 2; ``output_layer`` BN2d, Dropout(0.4), Flatten (channel-first),
    Linear to 512, BatchNorm1d without affine parameters; returns (embedding / norm, norm)."""

    def __init__(self, layers: list[int]):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks, cin = [], 64
        for count, width in zip(layers, WIDTHS):
            for i in range(count):
                blocks.append(AdaFaceBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(), nn.Linear(512 * 7 * 7, 512),
                                          nn.BatchNorm1d(512, affine=False))

    def forward(self, bgr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.output_layer(self.body(self.input_layer(bgr)))
        norm = torch.norm(x, 2, 1, True)
        return x / norm, norm


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN/PReLU parameter and running statistic a random value, so that a mapping that
    mixes two of them up shows in the outputs; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5)
    return model.eval()


def lightning_checkpoint(model: AdaFaceIR, classes: int = 10) -> dict:
    """What AdaFace's training writes: a Lightning checkpoint whose state_dict holds ``model.*`` (the
    backbone) and ``head.*`` (AdaFace's class centers and norm statistics) next to training state."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({"head.kernel": torch.randn(512, classes), "head.t": torch.zeros(1),
                  "head.batch_mean": torch.full((1,), 20.0), "head.batch_std": torch.full((1,), 100.0)})
    return {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.8.6", "state_dict": state,
            "hyper_parameters": {"arch": "ir_50", "lr": 0.1, "lr_milestones": [12, 20, 24]},
            "lr_schedulers": [{"milestones": Counter({12: 1, 20: 1}), "gamma": 0.1, "last_epoch": 3}]}


@pytest.mark.parametrize("layers", [[2, 1, 3, 1], [1, 2, 1, 2]], ids=["2-1-3-1", "1-2-1-2"])
def test_adaface_checkpoint_gives_the_same_embeddings_in_the_iresnet_layout(tmp_path: Path, layers) -> None:
    torch.manual_seed(0)
    adaface = randomize(AdaFaceIR(layers), seed=1)
    path = tmp_path / "adaface_ir.ckpt"
    torch.save(lightning_checkpoint(adaface), path)
    ours = facecore.create("backbones", "resnet50", embedding_size=512, layers=layers)
    report = load_pretrained(ours, path, "resnet50")
    ours.eval()

    rgb = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        direction, norm = adaface(rgb.flip(1))  # AdaFace is fed BGR; facecore feeds RGB
        embedding = ours(rgb)
    assert torch.allclose(embedding, direction * norm, rtol=1e-4, atol=1e-4 * float(norm.mean()))
    assert torch.allclose(nn.functional.normalize(embedding), direction, atol=1e-5)
    assert f"AdaFace IR with {layers} blocks" in report.source
    assert len(report.loaded) == len(ours.state_dict()) and not report.skipped
    assert any("head" in part and "classifier starts fresh" in why for part, why in report.unused.items())


def test_adaface_mapping_is_by_block_order_with_a_new_stage_at_each_conv_shortcut() -> None:
    state = AdaFaceIR([1, 2, 1, 2]).state_dict()
    mapped, layers = adaface_to_iresnet(state)
    assert layers == [1, 2, 1, 2]
    assert torch.equal(mapped["layer2.1.conv2.weight"], state["body.2.res_layer.4.weight"])
    assert torch.equal(mapped["layer4.0.downsample.1.running_var"], state["body.4.shortcut_layer.1.running_var"])
    assert torch.equal(mapped["layer4.1.prelu.weight"], state["body.5.res_layer.3.weight"])
    assert torch.equal(mapped["conv1.weight"], state["input_layer.0.weight"][:, [2, 1, 0]])
    assert torch.equal(mapped["layer1.0.downsample.0.weight"][:, :, 0, 0], torch.eye(64))
    assert torch.equal(mapped["features.weight"], torch.ones(512)) and torch.equal(mapped["features.bias"], torch.zeros(512))


def test_adaface_networks_without_an_iresnet_equivalent_are_refused_by_name() -> None:
    state = AdaFaceIR([1, 1, 1, 1]).state_dict()
    with pytest.raises(CheckpointError, match="IR-SE network"):
        adaface_to_iresnet({**state, "body.1.res_layer.se_block.fc1.weight": torch.ones(1)}, "ir_se.ckpt")
    with pytest.raises(CheckpointError, match="ir152.ckpt .*bottleneck blocks"):
        adaface_to_iresnet({**state, "body.0.res_layer.8.weight": torch.ones(1)}, "ir152.ckpt")


def test_adaface_depth_that_differs_from_the_config_names_the_keys_and_the_depth(tmp_path: Path) -> None:
    path = tmp_path / "adaface_ir.ckpt"
    torch.save(lightning_checkpoint(AdaFaceIR([2, 2, 1, 1])), path)
    ours = facecore.create("backbones", "resnet50", embedding_size=512, layers=[1, 1, 1, 1])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ours, path, "resnet50")
    message = str(err.value)
    assert "adaface_ir.ckpt (AdaFace IR with [2, 2, 1, 1] blocks" in message
    assert "does not fit the configured backbone 'resnet50'" in message and "unexpected key(s) in the file: layer1.1." in message
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())  # nothing half-loaded


def test_arcface_torch_training_checkpoint_and_ddp_prefix(tmp_path: Path) -> None:
    source = facecore.create("backbones", "resnet50", embedding_size=64, layers=[1, 1, 1, 1])
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 2, "global_step": 10, "state_dict_backbone": {f"module.{k}": v for k, v in source.state_dict().items()},
                "state_dict_softmax_fc": {"weight": torch.randn(7, 64)}}, path)
    target = facecore.create("backbones", "resnet50", embedding_size=64, layers=[1, 1, 1, 1])
    report = load_pretrained(target, path, "resnet50")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    assert "state_dict_backbone" in report.source and "state_dict_softmax_fc" in report.unused


def test_embedding_size_change_needs_the_embedding_layers_skipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = TinyNet(embedding_size=16)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    target = TinyNet(embedding_size=8)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(target, path, "tiny")
    assert "tiny.pth (state dict) does not fit the configured backbone 'tiny'" in str(err.value)
    assert "body.5.weight: file (16, 64) vs model (8, 64)" in str(err.value)
    assert "body.6" in str(err.value)  # every mismatching key is named, not just the first
    assert "list the embedding layers in model.pretrained_skip" not in str(err.value)  # TinyNet has no fc/features
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, path, "tiny", skip=["body.5", "body.6"])
    for key, value in target.state_dict().items():
        expected = fresh[key] if key.startswith(("body.5.", "body.6.")) else source.state_dict()[key]
        assert torch.equal(value, expected), key
    assert set(report.skipped) == {k for k in fresh if k.startswith(("body.5.", "body.6."))}
    assert any("model.pretrained_skip lists 'body.5'" in line for line in report.lines())
    with pytest.raises(ConfigError, match=r"model.pretrained_skip: 'fc' matches no tensor of backbone 'tiny' \(its top-level modules: body\)"):
        load_pretrained(target, path, "tiny", skip=["fc"])


def test_facecore_checkpoint_gives_its_backbone_and_says_what_it_leaves(tmp_path: Path) -> None:
    source = TinyNet(embedding_size=8)
    path = tmp_path / "last.pth"
    save_checkpoint({"config": {"model": {"backbone": "tiny", "embedding_size": 8}}, "backbone": source.state_dict(),
                     "classifier": {"weight": torch.randn(5, 8)}, "optimizer": {"state": {}, "param_groups": []}}, path)
    weights = backbone_weights(load_checkpoint(path), path)
    assert weights.state.keys() == source.state_dict().keys()
    assert set(weights.unused) == {"classifier", "optimizer, scheduler, step"}


@pytest.mark.parametrize("content, found", [({"epoch": 3, "notes": "best run"}, "a dict with keys ['epoch', 'notes']"),
                                            ([torch.ones(2)], "a list"), ({"state_dict": {"w": "text"}}, "a dict with keys ['w']")])
def test_a_file_without_a_state_dict_says_what_it_found_and_what_to_pass(tmp_path: Path, content, found) -> None:
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(TinyNet(), path, "tiny")
    assert f"weights.pth holds neither a facecore checkpoint nor a state dict of tensors (found {found}" in str(err.value)
    assert "backbone.pth" in str(err.value)  # what to pass instead
