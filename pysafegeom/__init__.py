"""pysafegeom: the safety geometry of language models.

Measures whether a model internally recognises harmful requests (the harmfulness carrier H), whether it
activates a refusal policy (the refusal carrier R), how tightly the two are coupled, and how that moves
over fine-tuning. The science is specified in docs/protocol.md.
"""

__version__ = "0.1.0"

from .models import load_model, ModelAdapter  # noqa: E402,F401
