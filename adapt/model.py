"""``AdaptModel``: region encoder + text encoder + ADAPT similarity, with Hub-style checkpoints.

A checkpoint is a folder (local, or a Hub model repo) holding ``config.json`` (an
:class:`~adapt.config.AdaptConfig`) and ``model.safetensors``. Loading never unpickles anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapt.concepts import ConceptRegionEncoder, ground_in_concepts
from adapt.config import AdaptConfig, ConfigError
from adapt.encoders import GRUTextEncoder, RegionEncoder, TokenBatch, TransformerTextEncoder
from adapt.similarity import DEFAULT_MEMORY_BUDGET_MB, AdaptiveSimilarity, Scores

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching its config."""


class AdaptModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="adapt",
    tags=["image-text-retrieval", "adapt", "cross-modal-retrieval"],
    paper_url="https://arxiv.org/abs/1911.09370",
    pipeline_tag="zero-shot-image-classification",
):
    """ADAPT image-text model (Wehrmann et al., AAAI 2020).

    Args:
        config: the architecture (an :class:`AdaptConfig` or its ``to_dict()``).
        load_pretrained: fill the frozen pretrained parts (word vectors, concept tables) from their
            sources and initialise a concept model at ConSE; ``from_pretrained`` skips this because the
            checkpoint carries them.

    Example::

        model = AdaptModel.from_pretrained("checkpoints/default")
        out = model.score(region_features, ["a cat on a sofa", "two planes"])
        out.scores  # (n_images, n_captions)
    """

    def __init__(self, config: AdaptConfig | dict[str, Any], load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = AdaptConfig.from_dict(config) if isinstance(config, dict) else config
        self._hub_mixin_config = self.config  # what save_pretrained writes to config.json
        cfg = self.config
        if cfg.text_encoder == "gru":
            self.text_encoder: GRUTextEncoder | TransformerTextEncoder = GRUTextEncoder(
                cfg.vocab, cfg.latent_size, cfg.word_dim, cfg.word_vectors,
                load_word_vectors=load_pretrained, pack_padding=not cfg.reference_padding,
                max_tokens=cfg.max_tokens,
            )
        else:
            self.text_encoder = TransformerTextEncoder(
                cfg.transformer_name, cfg.latent_size, cfg.finetune_transformer, cfg.max_tokens
            )
        if cfg.region_encoder == "concepts":
            hidden = self.text_encoder.backbone.config.hidden_size
            self.region_encoder: RegionEncoder | ConceptRegionEncoder = ConceptRegionEncoder(
                cfg.region_dim, cfg.latent_size, cfg.concepts, hidden)
        else:
            self.region_encoder = RegionEncoder(cfg.region_dim, cfg.latent_size)
        if isinstance(self.region_encoder, ConceptRegionEncoder) and load_pretrained:
            ground_in_concepts(self.region_encoder, self.text_encoder, cfg.concepts)
        self.similarity = AdaptiveSimilarity(
            cfg.directions, cfg.latent_size, cfg.lambda_t2i, cfg.lambda_i2t, cfg.normalization,
            cfg.reference_padding,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, captions: list[str]) -> TokenBatch:
        """Captions -> :class:`TokenBatch` for this model's text encoder (on CPU)."""
        return self.text_encoder.tokenize(captions)

    def encode_regions(self, region_features: torch.Tensor) -> torch.Tensor:
        """``(n_images, n_regions, region_dim)`` -> ``(n_images, n_regions, d)``."""
        if region_features.ndim != 3 or region_features.shape[-1] != self.config.region_dim:
            raise ValueError(
                f"expected region features of shape (n_images, n_regions, {self.config.region_dim}),"
                f" got {tuple(region_features.shape)}"
            )
        return self.region_encoder(region_features.to(self.device, torch.float32))

    def encode_text(self, captions: TokenBatch | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``words (n_captions, n_tokens, d)`` and ``mask (n_captions, n_tokens)``."""
        batch = self.tokenize(captions) if isinstance(captions, list) else captions
        batch = batch.to(self.device)
        return self.text_encoder(batch), batch.mask

    def forward(
        self,
        region_features: torch.Tensor,
        captions: TokenBatch | list[str],
        *,
        directions: tuple[str, ...] | None = None,
        return_attention: bool = False,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> Scores:
        """Score every image against every caption.

        Args:
            region_features: ``(n_images, n_regions, region_dim)``.
            captions: a list of strings or a tokenised :class:`TokenBatch`.
            directions: ``("t2i",)``, ``("i2t",)``, both, or ``("mean",)`` (the baseline without
                ADAPT on the same encoders); default: the model's kind.
            return_attention: also return fovea weights over regions (T2I) / words (I2T).
            memory_budget_mb: bound on the pair tensors alive at once.

        Returns:
            :class:`~adapt.similarity.Scores` with ``scores`` of shape ``(n_images, n_captions)``.
        """
        regions = self.encode_regions(region_features)
        words, mask = self.encode_text(captions)
        return self.similarity(
            regions, words, mask, directions=directions, return_attention=return_attention,
            memory_budget_mb=memory_budget_mb,
        )

    @torch.inference_mode()
    def score(self, region_features: torch.Tensor, captions: list[str], **kwargs: Any) -> Scores:
        """Inference-mode :meth:`forward` (the model is put in eval mode)."""
        self.eval()
        return self(region_features, captions, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------

    def _unsaved_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes not written to checkpoints: a frozen transformer is re-loaded."""
        if isinstance(self.text_encoder, TransformerTextEncoder) and not self.config.finetune_transformer:
            return ("text_encoder.backbone.",)
        return ()

    def _save_pretrained(self, save_directory: Path) -> None:
        skip = self._unsaved_prefixes()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith(skip)}
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | AdaptConfig | None = None,
        map_location: str | torch.device = "cpu",
        **_: Any,
    ) -> "AdaptModel":
        if config is None:
            raise CheckpointError(f"{model_id}: no {CONFIG_NAME} found; is this an adapt checkpoint?")
        try:
            model = cls(config, load_pretrained=False)
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{model_id}: invalid {CONFIG_NAME}: {e}") from e
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_NAME
            if not weights.is_file():
                raise CheckpointError(f"{model_id}: no {WEIGHTS_NAME} in the folder")
        else:
            weights = Path(hf_hub_download(
                model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            ))
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e
        model._check_state(state, str(weights))
        model.load_state_dict(state, strict=False)
        return model.to(map_location).eval()

    def _check_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped tensor."""
        skip = self._unsaved_prefixes()
        expected = {k: v.shape for k, v in self.state_dict().items() if not k.startswith(skip)}
        problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
        problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
        problems += [
            f"{k}: weights have shape {tuple(state[k].shape)}, config implies {tuple(expected[k])}"
            for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k]
        ]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
            raise CheckpointError(f"{where} does not match its {CONFIG_NAME}: {shown}")
