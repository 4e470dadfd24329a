"""The adversarial servers live in trustswarm.testing (the demo uses them too)."""

from trustswarm.testing.adversary import (  # noqa: F401
    OUTPUT_KINDS,
    WEIGHT_KINDS,
    Tamper,
    TamperingContext,
    adversarial_server_cls,
    quantize_,
    tamper_weights,
)
