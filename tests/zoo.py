"""The architecture zoo for layer discovery: torchvision, transformers and hand-written models,
each built without downloads at a size a CPU test can run (name -> (constructor, input size))."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from guard import archs


def _tv(name: str, **kw) -> Callable[[int], nn.Module]:
    return lambda c: torchvision.models.get_model(name, num_classes=c, **kw)


def _hf(kind: str) -> Callable[[int], nn.Module]:
    def build(c: int) -> nn.Module:
        import transformers as tf

        if kind == "vit":
            cfg = tf.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=128, num_labels=c)
            return tf.ViTForImageClassification(cfg)
        if kind == "resnet":
            cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
                                  layer_type="basic", num_labels=c)
            return tf.ResNetForImageClassification(cfg)
        cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 3, 1], num_labels=c)
        return tf.ConvNextForImageClassification(cfg)
    return build


def _hand(name: str, **kw) -> Callable[[int], nn.Module]:
    return lambda c: archs.build(name, c, **kw)


ZOO: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "torchvision resnet18": (_tv("resnet18"), 64),
    "torchvision vgg11_bn": (_tv("vgg11_bn"), 32),
    "torchvision mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64),
    "torchvision efficientnet_b0": (_tv("efficientnet_b0"), 32),
    "torchvision convnext_tiny": (_tv("convnext_tiny"), 32),
    "torchvision densenet121": (_tv("densenet121"), 32),
    "torchvision regnet_y_400mf": (_tv("regnet_y_400mf"), 32),
    "torchvision vit_b_16 (4 layers, patch 4)": (
        lambda c: torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                       hidden_dim=64, mlp_dim=128, num_classes=c), 32),
    "torchvision swin_t (embed 24)": (
        lambda c: torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=24, depths=[2, 2, 2],
                                                     num_heads=[2, 4, 8], window_size=[4, 4], num_classes=c), 32),
    "transformers ViT": (_hf("vit"), 32),
    "transformers ResNet": (_hf("resnet"), 32),
    "transformers ConvNeXt": (_hf("convnext"), 32),
    "hand: CIFAR ResNet-18 (own block, F.relu)": (_hand("cifar_resnet18", width=8), 32),
    "hand: PreAct ResNet-18": (_hand("cifar_preact_resnet18", width=8), 32),
    "hand: CIFAR VGG-11": (_hand("cifar_vgg11", width=16), 32),
    "hand: blocks in a ModuleList": (_hand("modulelist_net", width=16), 32),
    "hand: MLP": (_hand("mlp", width=64), 32),
    "hand: LeNet (functional forward)": (_hand("lenet", width=6), 32),
    "hand: ViT (timm style)": (_hand("tiny_vit", width=32, depth=6), 32),
}
