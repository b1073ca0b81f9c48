"""Textual inversion: a new word for a concept, learned as token embeddings (Gal et al., arXiv 2208.01618).

The tokenizer of every text encoder gets N new tokens ``<t>``, ``<t>_1`` ... ``<t>_{N-1}`` (diffusers'
multi-vector convention: its pipelines expand ``<t>`` in a prompt into all N), and the encoder's
token-embedding table gets N new rows v_0..v_{N-1}, each (d,), initialised from the row of an
existing one-token word (--init-word). Only those rows train; the text encoder, and every other row
of its table, stay frozen:

    e(id) = W0[id]            id < V            W0: (V, d), frozen, bit-identical after training
    e(id) = v[id - V]         V <= id < V + N   v: (N, d), the only trained tensor

The rows are a *separate parameter* (``TokenEmbedding.vectors``) rather than a gradient mask on a
grown table: AdamW's decoupled weight decay shrinks every element of a parameter whether or not its
gradient is zero, so a masked table would still drift. SDXL has two encoders (widths 768, 1280):
each gets its own rows and the file keeps both (``clip_l`` / ``clip_g``).

Inference needs no wrapper: ``install`` grows the table and writes the rows into it (a plain
``nn.Embedding`` again), as diffusers' ``load_textual_inversion`` does. ``Installed`` keeps the
pristine tokenizers and table sizes so a mix can drop an embedding again (the UI unticking it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from studio.errors import StudioError

DEFAULT_LR = 5e-3
"""diffusers' textual_inversion example trains at 5e-4 x batch 4 x grad-accum 4 (scale_lr): ~5e-3."""


def vector_tokens(token: str, vectors: int) -> list[str]:
    """The tokenizer entries of an N-vector embedding, in diffusers' naming."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def text_sides(pipe) -> dict[str, tuple]:
    """Component name (the adapter files' ``te`` / ``te1`` / ``te2``) -> (tokenizer, text encoder)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"te1": (pipe.tokenizer, pipe.text_encoder), "te2": (pipe.tokenizer_2, pipe.text_encoder_2)}
    return {"te": (pipe.tokenizer, pipe.text_encoder)}


def existing_token(tokenizer, token: str) -> bool:
    """True when ``token`` already means something to the tokenizer: a word of its vocabulary (CLIP
    spells words ``robot</w>``, and a one-piece word is one id) or a token added before."""
    if token in tokenizer.get_vocab() or token in tokenizer.added_tokens_encoder:
        return True
    return len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def check_token(tokenizers: list, token: str, where: str, flag: str = "--token") -> None:
    """Refuse a token the base already has (training it would change a word other prompts use)."""
    if not token or any(c.isspace() for c in token):
        raise StudioError(f"{flag} {token!r} in {where}: give one word without spaces, e.g. --token '<kbot>'")
    if any(existing_token(t, token) for t in tokenizers):
        stem = token.strip("<>") or "concept"
        suggestion = next((s for s in (f"<{stem}>", f"<{stem}-ti>", f"<{stem}-ti2>", f"<{stem}-ti3>")
                           if s != token and not any(existing_token(t, s) for t in tokenizers)), "<my-concept>")
        raise StudioError(f"{flag} {token!r} in {where} is already in the base's vocabulary: pick a new word such "
                          f"as {suggestion!r} (textual inversion teaches the model a word it does not know)")


def init_id(tokenizer, init_word: str, where: str) -> int:
    """The one token id of ``init_word``; its row is where the new vectors start (diffusers' rule)."""
    ids = tokenizer(init_word, add_special_tokens=False)["input_ids"] if init_word.strip() else []
    if not ids:
        raise StudioError(f"--init-word {init_word!r} in {where} tokenises to nothing: give a word close to the "
                          f"concept, e.g. --init-word robot")
    if len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise StudioError(f"--init-word {init_word!r} in {where} is {len(ids)} tokens ({' '.join(pieces)}): give a "
                          f"word the tokenizer keeps whole, e.g. --init-word robot")
    return ids[0]


class _Rows(nn.Module):
    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors.to(torch.float32).clone())  # (N, d), fp32 whatever the base


class TokenEmbedding(nn.Module):
    """The frozen table W0 (V, d) plus trainable rows ``vectors`` (N, d) for ids V..V+N-1.

    The rows sit in a child registered after the table, so the encoder's first parameter stays the
    table: diffusers takes a text encoder's dtype from it (``ModelMixin.dtype``), and fp32 rows first
    would make a half-precision base's prompt embeddings fp32 (the UNet then refuses them)."""

    def __init__(self, base: nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first = base.num_embeddings
        self.rows = _Rows(vectors)

    @property
    def vectors(self) -> nn.Parameter:
        return self.rows.vectors

    @property
    def weight(self) -> torch.Tensor:
        """The whole table (what ``get_input_embeddings().weight`` readers expect)."""
        return torch.cat([self.base.weight, self.vectors.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.first + len(self.vectors)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        out = self.base(ids.clamp(max=self.first - 1))  # (..., d); new ids look up a dummy row, replaced below
        if not bool(new.any()):
            return out
        rows = self.vectors.to(out.dtype)[(ids - self.first).clamp(min=0)]  # (..., d)
        return torch.where(new.unsqueeze(-1), rows, out)


def _add_tokens(tokenizer, names: list[str], first: int, where: str) -> None:
    if len(tokenizer) != first:
        raise StudioError(f"{where}: the tokenizer has {len(tokenizer)} entries but its text encoder {first} rows: "
                          f"load the base again")
    tokenizer.add_tokens(names)
    if tokenizer.convert_tokens_to_ids(names) != list(range(first, first + len(names))):  # one new id each, in order
        raise StudioError(f"{where}: the tokenizer did not add {names} as new tokens: pick another --token")


def add_trainable(pipe, token: str, init_word: str, vectors: int, where: str,
                  flag: str = "--token") -> dict[str, TokenEmbedding]:
    """Teach every tokenizer of ``pipe`` the N tokens and give its encoder trainable rows; returns
    component -> the module holding them. Everything is checked before anything changes."""
    if vectors < 1:
        raise StudioError(f"--vectors {vectors} in {where}: an embedding needs at least one vector, e.g. --vectors 2")
    sides = text_sides(pipe)
    check_token([tok for tok, _ in sides.values()], token, where, flag)
    starts = {c: init_id(tok, init_word, where) for c, (tok, _) in sides.items()}
    modules = {}
    for component, (tokenizer, encoder) in sides.items():
        base = encoder.get_input_embeddings()
        if isinstance(base, TokenEmbedding):
            raise StudioError(f"{where}: this text encoder already trains a token; train one token per run")
        start = base.weight.detach()[starts[component]].float().expand(vectors, -1)  # (N, d): N copies
        _add_tokens(tokenizer, vector_tokens(token, vectors), base.num_embeddings, where)
        modules[component] = TokenEmbedding(base, start)
        encoder.set_input_embeddings(modules[component])
    return modules


def trained_rows(pipe) -> dict[str, torch.Tensor]:
    """Component -> the (N, d) rows its encoder's ``TokenEmbedding`` trains (fp32, detached)."""
    rows = {}
    for component, (_, encoder) in text_sides(pipe).items():
        module = encoder.get_input_embeddings()
        if isinstance(module, TokenEmbedding):
            rows[component] = module.vectors.detach().float().clone()
    return rows


def restore_rows(pipe, rows: dict[str, torch.Tensor]) -> None:
    """Put checkpointed rows back into the training modules (resume)."""
    for component, (_, encoder) in text_sides(pipe).items():
        with torch.no_grad():
            encoder.get_input_embeddings().vectors.copy_(rows[component])


def install(tokenizer, encoder, token: str, rows: torch.Tensor, where: str) -> None:
    """Make ``token`` mean ``rows`` (N, d) at inference: new tokens and rows appended to the table."""
    table = encoder.get_input_embeddings()
    if isinstance(table, TokenEmbedding):
        raise StudioError(f"{where}: the text encoder is training a token; load embeddings on a fresh base")
    names = vector_tokens(token, len(rows))
    if existing_token(tokenizer, token):
        raise StudioError(f"{where}: token {token!r} is already a word of this base's vocabulary or of another "
                          f"embedding in the mix: rename the file (A1111 uses its name as the token) or drop the other")
    first = table.num_embeddings
    _add_tokens(tokenizer, names, first, where)
    encoder.resize_token_embeddings(first + len(rows), mean_resizing=False)  # the rows are written next
    with torch.no_grad():
        encoder.get_input_embeddings().weight[first:] = rows.to(table.weight.dtype)


class Installed:
    """The embeddings a pipeline's prompts currently know. ``sync`` restores the pristine tokenizers
    and tables first, so dropping or replacing one leaves no trace (a token that stayed in the
    tokenizer would go on meaning the old vectors)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.tokens: list[str] = []
        self._pristine = None  # (tokenizer copies, table sizes), taken before the first install

    def sync(self, embeddings: list) -> None:
        """Install exactly ``embeddings`` (``studio.formats.embedding.Embedding``), in order."""
        if self._pristine is None and not embeddings:
            return
        sides = text_sides(self.pipe)
        if self._pristine is None:
            self._pristine = ({c: copy.deepcopy(tok) for c, (tok, _) in sides.items()},
                              {c: enc.get_input_embeddings().num_embeddings for c, (_, enc) in sides.items()})
        tokenizers, sizes = self._pristine
        for component, (_, encoder) in sides.items():
            slot = "tokenizer_2" if component == "te2" else "tokenizer"
            setattr(self.pipe, slot, copy.deepcopy(tokenizers[component]))
            if encoder.get_input_embeddings().num_embeddings != sizes[component]:
                encoder.resize_token_embeddings(sizes[component], mean_resizing=False)
        self.tokens = []
        self._check(embeddings)
        for emb in embeddings:
            for component, (tokenizer, encoder) in text_sides(self.pipe).items():
                install(tokenizer, encoder, emb.token, emb.vectors[component], emb.where)
            self.tokens.append(emb.token)

    def _check(self, embeddings: list) -> None:
        """Everything that could stop an install half-way, asked of the pristine pipeline."""
        sides = text_sides(self.pipe)
        widths = {c: enc.get_input_embeddings().weight.shape[1] for c, (_, enc) in sides.items()}
        seen = {}
        for emb in embeddings:
            emb.check_fits(widths, "sdxl" if "te2" in sides else "sd15")
            if emb.token in seen:
                raise StudioError(f"{emb.where} and {seen[emb.token]} are both the token {emb.token!r}: keep one "
                                  f"of them in the mix")
            seen[emb.token] = emb.where
            if any(existing_token(tok, emb.token) for tok, _ in sides.values()):
                raise StudioError(f"{emb.where}: token {emb.token!r} is already a word of this base's vocabulary: "
                                  f"rename the file (A1111 uses its name as the token)")


def in_prompt(token: str, *prompts: str | None) -> bool:
    """Whether ``token`` appears in any of the prompts (diffusers' conversion matches the text)."""
    return any(token in (p or "") for p in prompts)
