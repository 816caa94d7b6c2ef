"""Where models come from: the registry (your factories and modules, CIFAR zoo, torchvision, timm) and checkpoints.

Example:
    >>> from nd_plugin.adapters import create_model, default_input_size, list_models
    >>> model = create_model("cifar:resnet20")
    >>> default_input_size(model)
    (3, 32, 32)
    >>> "tv:resnet18" in list_models("resnet18")
    True
"""

from .checkpoint import load_checkpoint, read_state_dict
from .cifar import (
    CIFAR_MODELS,
    CifarResNet,
    CifarVGG,
)
from .cifar import (
    resnet20 as cifar_resnet20,
)
from .cifar import (
    resnet32 as cifar_resnet32,
)
from .cifar import (
    resnet44 as cifar_resnet44,
)
from .cifar import (
    resnet56 as cifar_resnet56,
)
from .cifar import (
    resnet110 as cifar_resnet110,
)
from .cifar import (
    vgg16_bn as cifar_vgg16_bn,
)
from .registry import (
    SOURCES,
    create_model,
    default_input_size,
    list_models,
    register_model,
    resolve_name,
    unregister_model,
)

__all__ = [
    "SOURCES",
    "list_models",
    "create_model",
    "resolve_name",
    "register_model",
    "unregister_model",
    "default_input_size",
    "load_checkpoint",
    "read_state_dict",
    "CIFAR_MODELS",
    "CifarResNet",
    "CifarVGG",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_vgg16_bn",
]
