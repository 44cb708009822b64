"""The CIFAR zoo of the CRD benchmark (RepDistiller's architectures, same parameter counts) plus
the CIFAR-stem ResNet18/34 of KDA. Importing this package registers every model by name
(``kdx.models.registry.create_model("resnet8x4", num_classes=100)``); all take 3×32×32 inputs.
"""

from kdx.models.cifar.mobilenetv2 import MobileNetV2
from kdx.models.cifar.resnet import CifarResNet
from kdx.models.cifar.resnet_imagenet_style import CifarStemResNet
from kdx.models.cifar.shufflenetv1 import ShuffleNetV1
from kdx.models.cifar.shufflenetv2 import ShuffleNetV2
from kdx.models.cifar.vgg import VGG
from kdx.models.cifar.wrn import WideResNet

__all__ = [
    "VGG",
    "CifarResNet",
    "CifarStemResNet",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "WideResNet",
]
