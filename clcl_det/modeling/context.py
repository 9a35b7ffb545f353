"""What the heads receive besides features: the vocabulary and the frozen CLIP outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from torch import Tensor

if TYPE_CHECKING:  # data is a lower layer; for the annotation only
    from ..data.continual import Task

__all__ = ["HeadContext"]


@dataclass
class HeadContext:
    """Per-batch inputs shared by RoI and classification heads."""

    class_embeddings: Tensor  # K x D prompt-ensembled text embeddings of the classes in the vocabulary
    background_embedding: Tensor  # D, text embedding of the background prompt
    clip_dense: Tensor  # B x D x h x w, L2-normalised dense CLIP map V
    clip_stride: int  # pixels per cell of V
    image_sizes: List[Tuple[int, int]]  # (h, w) of each image's content inside the padded batch
    task: Optional["Task"] = None  # the current continual Task (None outside the continual loop)
    class_names: Tuple[str, ...] = ()  # names of the K classes of class_embeddings
    background_absorbs: int = 0  # training: a background label also accepts classes 0..n-1 (unbiased CE)
    clip_logit_scale: float = 100.0  # the frozen CLIP's logit scale exp(s): its image-text cosine -> logit factor
    extras: Dict[str, Any] = field(default_factory=dict)  # method-specific per-batch tensors (e.g. the cost volume)

    @property
    def num_classes(self) -> int:
        return int(self.class_embeddings.shape[0])

    def get(self, key: str, default: Optional[Any] = None) -> Any:
        return self.extras.get(key, default)
