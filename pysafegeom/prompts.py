"""Format instructions with a chat template and locate ``t_inst`` and the post-instruction positions.

PROTOCOL.md section 1. The template is rendered once around a sentinel and split into the text before
the instruction (``prefix``) and after it (``suffix``), as HarmBench's ``get_test_case_wrapping`` does,
with no per-family rules. Every prompt is then tokenised as ``tokens(prefix + instruction)`` followed by
the template's own tokens for the suffix, so that

* ``t_inst`` is the last token of ``prefix + instruction`` (the last token of the instruction), and
* the post-instruction positions are exactly the suffix tokens, the same ``n_post`` ids for every
  prompt, with ``t_post_inst`` the last prompt token,

whatever the instruction ends with (spaces, punctuation, newlines, non-ASCII): no token can straddle the
instruction/template boundary. Batches are left-padded, so post-instruction positions line up at the
same negative offsets across a batch.

Control tokens come from the template only. Text that spells a control token (``<|im_end|>``,
``<|eot_id|>``, ``[INST]``: any of :func:`special_token_strings`) is tokenised as ordinary text, as a chat
API does, so an instruction cannot forge a turn: such an instruction is tokenised as
``tokens(prefix up to its last control token)`` followed by ``tokens(rest of prefix + instruction)`` with
special tokens split. Instructions without such text are tokenised exactly as described above.
``allow_special_tokens=True`` turns this off for callers who mean to write control tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from dataclasses import dataclass, field

import torch

from . import validate as V
from .errors import InvalidArgument, InvalidType

SENTINEL = "PSGSENTINELXYZ."

# Named templates, for tokenizers that carry none or to study a model under another format.
TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-2": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '[INST] <<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}"
        "{% elif m['role'] == 'user' %}{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}{{ '[INST] ' }}{% endif %}"
        "{{ m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('the Mistral template has no system role') }}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('the Gemma template has no system role') }}{% endif %}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # No chat format: the instruction followed by one newline (base models). Must be asked for by name.
    "plain": "{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}",
}


class TemplateError(InvalidArgument):
    """The chat template cannot be used to locate instruction positions (a ``ValueError``)."""


@dataclass
class PromptBatch:
    """A left-padded batch of formatted prompts and the positions the protocol reads.

    ``input_ids``/``attention_mask``: ``[B, T]``. ``t_inst``: ``[B]`` absolute index of the last
    instruction token. ``post_inst``: ``[B, n_post]`` absolute indices of the post-instruction template
    tokens (``post_inst[:, -1] == T - 1`` is ``t_post_inst``). ``positions``: ``[B, 1 + n_post]``, the
    columns ``[t_inst, post_inst...]`` as used by capture; ``position_names`` names those columns.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    t_inst: torch.Tensor
    post_inst: torch.Tensor
    prefix: str
    suffix: str
    suffix_ids: list[int]
    instructions: list[str]
    lengths: list[int] = field(default_factory=list)

    @property
    def n_post(self) -> int:
        return self.post_inst.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([self.t_inst[:, None], self.post_inst], dim=1)

    @property
    def position_names(self) -> list[str]:
        """``t_inst`` then the post-instruction offsets ``eoi-{n}..eoi-1`` (``eoi-1`` is ``t_post_inst``)."""
        n = self.n_post
        return ["t_inst"] + [f"eoi-{n - j}" for j in range(n)]

    def to(self, device) -> "PromptBatch":
        for name in ("input_ids", "attention_mask", "t_inst", "post_inst"):
            setattr(self, name, getattr(self, name).to(device))
        return self


@dataclass(frozen=True)
class TemplateSplit:
    prefix: str
    suffix: str
    suffix_ids: tuple[int, ...]
    template: str


def _render(tokenizer, template: str | None, content: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": content}]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        if system is not None:
            raise TemplateError(f"the chat template cannot render a system prompt ({exc}); pass system=None") from exc
        raise TemplateError(f"the chat template failed to render a user message: {exc}") from exc


def resolve_template(tokenizer, template: str | None) -> str:
    """The Jinja template to use: a named one, the given string, or the tokenizer's own."""
    if template is None:
        tpl = getattr(tokenizer, "chat_template", None)
        if not tpl:
            raise TemplateError(
                "this tokenizer has no chat template; pass template= one of "
                f"{', '.join(TEMPLATES)} (e.g. template='plain' for a base model with no chat format) or a Jinja string"
            )
        if isinstance(tpl, dict):
            tpl = tpl.get("default") or next(iter(tpl.values()))
        return tpl
    if not isinstance(template, str):
        raise InvalidType(f"template must be None (the tokenizer's own), a name ({', '.join(TEMPLATES)}) or a Jinja "
                          f"string, got {type(template).__name__} {V.show(template)}")
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{{" not in template and "{%" not in template:  # not Jinja: a name, misspelt or unknown
        near = difflib.get_close_matches(template.lower(), list(TEMPLATES), n=1, cutoff=0.6)
        raise TemplateError(f"unknown template {template!r}: not one of the named templates ({', '.join(TEMPLATES)}) "
                            "and not a Jinja string (no {{ or {%)" + (f"; did you mean {near[0]!r}?" if near else ""))
    return template


def split_template(tokenizer, template: str | None = None, system: str | None = None) -> TemplateSplit:
    """Render the template around a sentinel and return the text and token ids on either side of it."""
    tpl = resolve_template(tokenizer, template)
    text = _render(tokenizer, tpl, SENTINEL, system)
    n = text.count(SENTINEL)
    if n == 0:
        raise TemplateError("the chat template does not render the user message (it has no user turn), so the "
                            "instruction cannot be located; pass template= a template with a user turn")
    if n > 1:
        raise TemplateError("the chat template renders the user message more than once; cannot locate the instruction")
    prefix, suffix = text.split(SENTINEL)
    if not suffix:
        raise TemplateError("the chat template puts nothing after the user message, so there are no post-instruction "
                            "tokens; use a template with a generation prompt (or template='plain')")
    head = tokenizer(prefix + SENTINEL, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        suffix_ids = full[len(head):]
    else:  # the sentinel's last token merged with the template: tokenise the suffix on its own
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not suffix_ids:
        raise TemplateError("the template's post-instruction text tokenises to nothing")
    return TemplateSplit(prefix, suffix, tuple(suffix_ids), tpl)


def end_of_turn_ids(tokenizer, template: str | None = None) -> list[int]:
    """The tokens the template puts after an assistant message (trailing whitespace dropped), e.g.
    ``<|im_end|>``; the EOS token when the template writes nothing there."""
    tpl = resolve_template(tokenizer, template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=tpl, tokenize=False)
    except Exception as exc:
        raise TemplateError(f"the chat template cannot render an assistant turn: {exc}") from exc
    tail = text.split(SENTINEL, 1)[1].rstrip() if SENTINEL in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if not ids:
        if tokenizer.eos_token_id is None:
            raise TemplateError("the template ends assistant turns with nothing and the tokenizer has no EOS token")
        ids = [int(tokenizer.eos_token_id)]
    return ids



_PROBE = "  \n PSG probe: Ünïcödé {x} \t\n "


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """Every string the tokenizer turns into a control token: ``all_special_tokens`` and the added tokens
    marked special (longest first)."""
    out = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            out.add(str(getattr(t, "content", t)))
    return tuple(sorted((s for s in out if s), key=lambda s: (-len(s), s)))


def encode_after_prefix(tokenizer, prefix: str, bodies: list[str], *, allow_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of ``prefix + body`` for each body, control tokens coming from ``prefix`` only.

    A body that contains no control-token text (or every body, with ``allow_special_tokens=True``) is
    tokenised jointly with the prefix, as ``tokenizer(prefix + body)``. A body that does is tokenised
    with special tokens split into text (``split_special_tokens=True``), together with the part of the
    prefix after its last control token, so the text around the boundary merges as usual.
    """
    specials = () if allow_special_tokens else special_token_strings(tokenizer)
    forged = [i for i, b in enumerate(bodies) if any(s in b for s in specials)]
    out: list[list[int] | None] = [None] * len(bodies)
    skip = set(forged)
    plain = [i for i in range(len(bodies)) if i not in skip]
    if plain:
        ids = tokenizer([prefix + bodies[i] for i in plain], add_special_tokens=False)["input_ids"]
        for i, r in zip(plain, ids):
            out[i] = list(r)
    if forged:
        cut = max((prefix.rfind(s) + len(s) for s in specials if s in prefix), default=0)
        head = list(tokenizer(prefix[:cut], add_special_tokens=False)["input_ids"]) if cut else []
        tails = tokenizer([prefix[cut:] + bodies[i] for i in forged], add_special_tokens=False,
                          split_special_tokens=True)["input_ids"]
        for i, r in zip(forged, tails):
            out[i] = head + list(r)
    return out


def encode_text(tokenizer, text: str, *, allow_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text`` alone (no BOS), control-token text tokenised as text unless ``allow_special_tokens``."""
    split = not allow_special_tokens and any(s in text for s in special_token_strings(tokenizer))
    kw = {"split_special_tokens": True} if split else {}
    return list(tokenizer(text, add_special_tokens=False, **kw)["input_ids"])


@dataclass
class EncodedPrompts:
    """Unpadded token rows of formatted prompts: ``rows[i] = tokens(prefix + instruction_i) + suffix_ids``."""

    split: TemplateSplit
    rows: list[list[int]]
    instructions: list[str]


def _content_is_verbatim(tokenizer, split: TemplateSplit, system: str | None) -> bool:
    """Whether the template inserts the user content unchanged (then per-prompt rendering can be skipped)."""
    rendered = _render(tokenizer, split.template, _PROBE, system)
    return rendered == split.prefix + _PROBE + split.suffix


def encode_prompts(
    tokenizer,
    instructions: list[str],
    *,
    system: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    allow_special_tokens: bool = False,
) -> EncodedPrompts:
    """Validate and tokenise ``instructions`` with the chat template (no padding); see :func:`format_prompts`.

    Control-token text in an instruction is tokenised as text unless ``allow_special_tokens=True``
    (:func:`encode_after_prefix`)."""
    instructions = V.prompt_list("instructions", instructions, item="instruction")
    if system is not None and not isinstance(system, str):
        raise InvalidType(f"system must be a string (the system prompt) or None, got {type(system).__name__}")
    if max_length is not None:
        V.positive_int("max_length", max_length)
    memo = _ENCODINGS.get()
    if memo is not None:
        key = (id(tokenizer), template, system, bool(allow_special_tokens), tuple(instructions))
        hit = memo["rows"].get(key)
        if hit is not None and hit[0] is tokenizer:
            memo["hits"] += 1
            _check_length(hit[1].rows, max_length)
            return hit[1]
        memo["misses"] += 1
        enc = _encode(tokenizer, instructions, system, template, allow_special_tokens)
        memo["rows"][key] = (tokenizer, enc)
        _check_length(enc.rows, max_length)
        return enc
    enc = _encode(tokenizer, instructions, system, template, allow_special_tokens)
    _check_length(enc.rows, max_length)
    return enc


def _check_length(rows, max_length):
    if max_length is not None:
        worst = max(range(len(rows)), key=lambda i: len(rows[i]))
        if len(rows[worst]) > max_length:
            raise ValueError(f"prompt {worst} is {len(rows[worst])} tokens long, more than the model's context of "
                             f"{max_length} tokens")


_ENCODINGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pysafegeom_encodings", default=None)


@contextlib.contextmanager
def shared_encoding():
    """Within this block :func:`encode_prompts` tokenises each (tokenizer, template, system, prompt list) once and
    hands the same :class:`EncodedPrompts` to every later call (treat it as read-only): capture, selection,
    generation and replay of many checkpoints with one tokenizer share one encoding (:func:`pysafegeom.trajectory`).
    Yields the memo's counters ``{"hits": n, "misses": n}`` (read them, do not change them)."""
    outer = _ENCODINGS.get()
    if outer is not None:  # nested: the outer block's memo serves
        yield outer
        return
    memo = {"rows": {}, "hits": 0, "misses": 0}
    token = _ENCODINGS.set(memo)
    try:
        yield memo
    finally:
        _ENCODINGS.reset(token)


def _encode(tokenizer, instructions, system, template, allow_special_tokens) -> EncodedPrompts:
    split = split_template(tokenizer, template, system)
    if _content_is_verbatim(tokenizer, split, system):
        bodies = instructions
    else:  # the template transforms the content (e.g. trims it): take each rendered instruction text
        bodies = []
        for s in instructions:
            rendered = _render(tokenizer, split.template, s, system)
            if not (rendered.startswith(split.prefix) and rendered.endswith(split.suffix)):
                raise TemplateError("the chat template renders text around the instruction that depends on the "
                                    "instruction; cannot locate positions consistently")
            bodies.append(rendered[len(split.prefix): len(rendered) - len(split.suffix)])
    heads = encode_after_prefix(tokenizer, split.prefix, bodies, allow_special_tokens=allow_special_tokens)
    rows = [list(h) + list(split.suffix_ids) for h in heads]
    return EncodedPrompts(split, rows, instructions)


def pad_prompts(tokenizer, enc: EncodedPrompts, indices: list[int] | None = None,
                device: str | torch.device | None = None) -> PromptBatch:
    """Left-pad the rows ``indices`` (default: all) of ``enc`` into a :class:`PromptBatch`."""
    idx = list(range(len(enc.rows))) if indices is None else list(indices)
    rows = [enc.rows[i] for i in idx]
    lengths = [len(r) for r in rows]
    T = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise TemplateError("the tokenizer has neither a pad token nor an EOS token to pad with")
    B, n_post = len(rows), len(enc.split.suffix_ids)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = 1
    post = torch.arange(T - n_post, T, dtype=torch.long).expand(B, n_post).contiguous()
    t_inst = torch.full((B,), T - n_post - 1, dtype=torch.long)
    batch = PromptBatch(ids, mask, t_inst, post, enc.split.prefix, enc.split.suffix, list(enc.split.suffix_ids),
                        [enc.instructions[i] for i in idx], lengths)
    return batch.to(device) if device is not None else batch


def format_prompts(
    tokenizer,
    instructions: list[str],
    *,
    system: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    allow_special_tokens: bool = False,
) -> PromptBatch:
    """Format ``instructions`` with the chat template, left-pad, and locate ``t_inst`` and the post-instruction tokens.

    ``template``: None for the tokenizer's own chat template, a name from :data:`TEMPLATES`, or a Jinja
    string. ``system``: an optional system prompt. ``max_length``: raise if a prompt is longer (e.g.
    the model's context size). ``allow_special_tokens``: tokenise control-token text in the
    instructions (``<|im_end|>``...) as control tokens rather than as text (see the module docstring).
    """
    enc = encode_prompts(tokenizer, instructions, system=system, template=template, max_length=max_length,
                         allow_special_tokens=allow_special_tokens)
    return pad_prompts(tokenizer, enc, device=device)


def encode_batches(tokenizer, prompts: "list[str] | EncodedPrompts", template: str | None = None, system: str | None = None,
                   batch_size: int = 32, device=None) -> list[PromptBatch]:
    """Tokenise ``prompts`` once and cut them, in order, into left-padded batches of ``batch_size``."""
    V.positive_int("batch_size", batch_size, hint="prompts per batch")
    # already-encoded prompts (an EncodedPrompts) are cut as they are; template/system are then ignored
    enc = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(tokenizer, prompts, template=template, system=system)
    return [pad_prompts(tokenizer, enc, range(i, min(i + batch_size, len(enc.rows))), device=device)
            for i in range(0, len(enc.rows), batch_size)]
