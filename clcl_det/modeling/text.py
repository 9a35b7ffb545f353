"""Text side of the frozen CLIP: prompt-ensembled class embeddings and description tokens."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn

__all__ = ["TEMPLATE_SETS", "TextEncoder"]

TEMPLATE_SETS: Dict[str, Sequence[Callable[[str], str]]] = {
    "imagenet": OPENAI_IMAGENET_TEMPLATES,  # CLIP's 80 ImageNet prompts
    "simple": SIMPLE_IMAGENET_TEMPLATES,  # the 7-prompt subset
}


class TextEncoder:
    """Encodes class names (prompt ensemble, cached) and sentences (token-level outputs) with a
    frozen open_clip text tower. Not an nn.Module: the CLIP model is owned by the meta-arch.

    `text_names` maps a dataset's class name to the words the prompts use (VOC "diningtable" ->
    "dining table"); names not in it are used as they are.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, templates: str = "imagenet",
                 text_names: Optional[Mapping[str, str]] = None):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"MODEL.CLIP.TEMPLATES '{templates}' is not one of {sorted(TEMPLATE_SETS)}")
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.templates = TEMPLATE_SETS[templates]
        self.text_names: Dict[str, str] = dict(text_names or {})
        self._cache: Dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def encode_sentences(self, sentences: Sequence[str]) -> Tensor:
        """Sentence embeddings (N x D, L2-normalised)."""
        tokens = self.tokenizer(list(sentences)).to(self.device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_classes(self, names: Sequence[str]) -> Tensor:
        """Prompt-ensembled embeddings (K x D): templates averaged, renormalised; cached per name."""
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            prompts = [t(self.text_names.get(n, n)) for n in missing for t in self.templates]
            emb = self.encode_sentences(prompts).view(len(missing), len(self.templates), -1)
            for n, e in zip(missing, F.normalize(emb.mean(1), dim=-1)):
                self._cache[n] = e.cpu()
        return torch.stack([self._cache[n] for n in names]).to(self.device)

    @torch.no_grad()
    def encode_tokens(self, sentences: Sequence[str]) -> Tuple[List[Tensor], Tensor]:
        """Per sentence, its non-padding token outputs after ln_final and the text projection
        (L_i x D, L2-normalised), and the sentence embeddings (N x D)."""
        clip = self.clip
        tokens = self.tokenizer(list(sentences)).to(self.device)
        if not hasattr(clip, "token_embedding"):
            raise NotImplementedError(f"token-level text features need a standard CLIP text tower ({type(clip).__name__})")
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        proj = x @ clip.text_projection if isinstance(clip.text_projection, Tensor) else clip.text_projection(x)
        eot = tokens.argmax(dim=-1)  # the EOT token has the largest id
        sentence = F.normalize(proj[torch.arange(len(tokens)), eot].float(), dim=-1)
        per_token = [F.normalize(proj[i, 1 : int(eot[i])].float(), dim=-1) for i in range(len(tokens))]
        return per_token, sentence
