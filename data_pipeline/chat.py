"""Chat data for post-training: the record format, the template, packing.

A chat record is a JSON line (or a row of a Hugging Face dataset: a `save_to_disk`
directory or parquet / arrow files) with a `messages` list of `{"role", "content"}`
(roles `system`, `user`, `assistant`), the common convention. A preference record
(DPO) has `prompt` (a messages list, or a string = one user turn), `chosen` and
`rejected` (an assistant reply: a string or a `{"role": "assistant", "content"}`
message).

The template puts each message between its role marker and `<|end|>`:

  <s><|system|>TEXT<|end|><|user|>TEXT<|end|><|assistant|>TEXT<|end|>...</s>

The four markers are *control* pieces of the tokenizer (added when the tokenizer is
trained with `data.chat_tokens=True`): encoding text never produces them, so a
user who types "<|assistant|>" cannot forge a turn. Only assistant text and the
assistant's `<|end|>` are trained on (`loss_mask` on their target positions): the
model learns to answer and to stop, never to imitate the user.

A round is one user turn with the assistant reply that follows; samples with more
than `max_rounds` rounds are dropped and counted (the paper drops samples over 8
rounds). Packing concatenates samples into sequences of `seq_len` tokens and never
splits a sample across two sequences unless it is longer than one sequence by
itself (then it starts a sequence of its own and continues into the next).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from data_pipeline import hf_corpus
from m3jax.core.errors import InputError

ROLES = ("system", "user", "assistant")
ROLE_PIECES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_PIECE = "<|end|>"
CONTROL_PIECES = (*ROLE_PIECES.values(), END_PIECE)


class ChatFormatError(InputError):
  """A chat or preference record is malformed; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


def _where(path: str, lineno: int) -> str:
  return f"{path}: line {lineno}"


def parse_messages(value: Any, where: str, *, field: str = "messages") -> list[Message]:
  """Validates a messages list: roles known, contents strings, alternation sane."""
  if not isinstance(value, list) or not value:
    raise ChatFormatError(f"{where}: `{field}` must be a non-empty list of "
                          "{{\"role\", \"content\"}} objects")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ChatFormatError(f"{where}: `{field}[{i}]` must be an object with `role` and "
                            "`content`")
    if m["role"] not in ROLES:
      raise ChatFormatError(f"{where}: `{field}[{i}].role` is {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
    if not isinstance(m["content"], str):
      raise ChatFormatError(f"{where}: `{field}[{i}].content` must be a string")
    if m["role"] == "system" and i != 0:
      raise ChatFormatError(f"{where}: `{field}[{i}]`: a system message may only come first")
    out.append(Message(m["role"], m["content"]))
  return out


def as_messages(prompt: Any) -> list[Message]:
  """A conversation from a string (one user turn), Messages, or role/content dicts."""
  if isinstance(prompt, str):
    return [Message("user", prompt)]
  return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in prompt]


def query_text(messages: Sequence[Message]) -> str:
  """The text a retriever reads for a conversation: its turns' contents, in order."""
  return "\n".join(m.content for m in messages)


def count_rounds(messages: Sequence[Message]) -> int:
  """Number of user turns (a round = a user turn and the reply that follows)."""
  return sum(m.role == "user" for m in messages)


def _reply(value: Any, where: str, field: str) -> Message:
  if isinstance(value, str):
    return Message("assistant", value)
  if isinstance(value, dict) and value.get("role", "assistant") == "assistant" and \
      isinstance(value.get("content"), str):
    return Message("assistant", value["content"])
  raise ChatFormatError(f"{where}: `{field}` must be a string or an assistant message")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  prompt: tuple[Message, ...]
  chosen: Message
  rejected: Message


def parse_chat_record(rec: dict[str, Any], where: str) -> list[Message]:
  """One chat record -> its messages (ChatFormatError names `where`)."""
  if "messages" not in rec:
    raise ChatFormatError(f"{where}: no `messages` field")
  msgs = parse_messages(rec["messages"], where)
  if not any(m.role == "assistant" for m in msgs):
    raise ChatFormatError(f"{where}: no assistant message (nothing to train on)")
  return msgs


def parse_preference_record(rec: dict[str, Any], where: str) -> PreferencePair:
  """One preference record -> (prompt, chosen, rejected)."""
  for k in ("prompt", "chosen", "rejected"):
    if k not in rec:
      raise ChatFormatError(f"{where}: no `{k}` field (a preference record has prompt, "
                            "chosen and rejected)")
  prompt = rec["prompt"]
  msgs = ([Message("user", prompt)] if isinstance(prompt, str)
          else parse_messages(prompt, where, field="prompt"))
  if msgs[-1].role == "assistant":
    raise ChatFormatError(f"{where}: `prompt` ends with an assistant message; it must end "
                          "with the turn the reply answers")
  return PreferencePair(tuple(msgs), _reply(rec["chosen"], where, "chosen"),
                        _reply(rec["rejected"], where, "rejected"))


def parse_json_object(line: str, where: str) -> dict:
  try:
    rec = json.loads(line)
  except json.JSONDecodeError as e:
    raise ChatFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(rec, dict):
    raise ChatFormatError(f"{where}: expected a JSON object")
  return rec


def iter_jsonl(path: str) -> Iterator[tuple[str, str]]:
  """(where, line) for each non-blank line of a UTF-8 JSONL file."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise ChatFormatError(f"{path}: no such file") from None
  with f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        raise ChatFormatError(f"{_where(path, lineno)}: not UTF-8 text") from None
      if line.strip():
        yield _where(path, lineno), line


@dataclasses.dataclass
class ReadStats:
  """What reading kept and dropped (recorded in the data manifest)."""
  records: int = 0
  kept: int = 0
  dropped_over_max_rounds: int = 0

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def read_chats(paths: Sequence[str], *, max_rounds: int = 0
               ) -> tuple[list[list[Message]], ReadStats]:
  """All chats of `paths`, dropping those over `max_rounds` rounds (0 = keep all)."""
  stats, chats = ReadStats(), []
  for path in paths:
    for where, rec in iter_records(path, "messages"):
      msgs = parse_chat_record(rec, where)
      stats.records += 1
      if max_rounds and count_rounds(msgs) > max_rounds:
        stats.dropped_over_max_rounds += 1
        continue
      chats.append(msgs)
      stats.kept += 1
  return chats, stats


def read_preferences(paths: Sequence[str]) -> list[PreferencePair]:
  return [parse_preference_record(rec, where)
          for path in paths for where, rec in iter_records(path, "prompt")]


def iter_records(path: str, field: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, record) of a `.jsonl` file (where = file and line), or of a Hugging Face
  dataset: a `save_to_disk` directory or `.parquet` / `.arrow` files (where = row),
  read through the corpus pipeline's `data_pipeline.hf_corpus`; `field` is a column
  the records must have."""
  if path.endswith(".jsonl"):
    for where, line in iter_jsonl(path):
      yield where, parse_json_object(line, where)
    return
  spec = dict(what=path, source=hf_corpus.resolve(path, path), split="train",
              streaming=False, text_field=field)
  for i, row in enumerate(hf_corpus.open_dataset(spec)):
    yield f"{path}: row {i}", dict(row)


def read_chat_prompts(path: str | None, inline: Sequence[str] = ()) -> list[list[Message]]:
  """Conversations to complete: inline user turns, and a file of user turns (one per
  line) or JSONL lines with a `messages` list (ending with a user turn)."""
  chats = [[Message("user", p.replace("\\n", "\n"))] for p in inline]
  if path and path.endswith(".jsonl"):
    for where, line in iter_jsonl(path):
      rec = parse_json_object(line, where)
      chats.append(parse_messages(rec.get("messages"), where))
  elif path:
    for where, line in iter_jsonl(path):
      chats.append([Message("user", line.rstrip("\n").replace("\\n", "\n"))])
  if not chats:
    raise ChatFormatError("no prompts: pass --prompt=... or --prompts_file=...")
  return chats


class ChatTemplate:
  """Renders messages to token ids and the mask of the tokens trained on.

  `tokenizer` is a data_pipeline.tokenizer.Tokenizer (anything with `encode`,
  `piece_to_id`, `bos_id`, `eos_id`, `path`).
  """

  def __init__(self, tokenizer: Any):
    ids = {p: tokenizer.piece_to_id(p) for p in CONTROL_PIECES}
    missing = [p for p, i in ids.items() if i is None]
    if missing:
      raise ChatFormatError(
          f"tokenizer {getattr(tokenizer, 'path', '') or '<memory>'} has no chat role tokens "
          f"({', '.join(missing)}); train the tokenizer with data.chat_tokens=True")
    self.tokenizer = tokenizer
    self.role_ids = {r: ids[p] for r, p in ROLE_PIECES.items()}
    self.end_id = ids[END_PIECE]

  def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
             add_eos: bool = True) -> tuple[list[int], list[bool]]:
    """(tokens, trained) where trained[i] says token i is assistant text or its end marker.

    With `add_generation_prompt`, the assistant marker is appended (the prompt a
    model completes) and no `</s>` is added.
    """
    tokens, trained = [self.tokenizer.bos_id], [False]
    for m in messages:
      body = self.tokenizer.encode(m.content)
      is_reply = m.role == "assistant"
      tokens += [self.role_ids[m.role], *body, self.end_id]
      trained += [False] + [is_reply] * (len(body) + 1)
    if add_generation_prompt:
      tokens.append(self.role_ids["assistant"])
      trained.append(False)
    elif add_eos:
      tokens.append(self.tokenizer.eos_id)
      trained.append(False)
    return tokens, trained

  def prompt(self, messages: Sequence[Message]) -> list[int]:
    """Tokens of `messages` followed by the assistant marker (what `generate --chat` feeds)."""
    return self.render(messages, add_generation_prompt=True)[0]

  def reply(self, text: str) -> list[int]:
    """Tokens of an assistant reply after its marker: the text and `<|end|>`."""
    return [*self.tokenizer.encode(text), self.end_id]

  def decode(self, tokens: Sequence[int]) -> str:
    """Text of an ids list with the markers shown as their pieces (round-trip aid)."""
    names = {i: p for p, i in zip(CONTROL_PIECES, [*self.role_ids.values(), self.end_id])}
    out, run = [], []
    for t in tokens:
      if int(t) in names:
        out.append(self.tokenizer.decode(run))
        out.append(names[int(t)])
        run = []
      elif int(t) not in (self.tokenizer.bos_id, self.tokenizer.eos_id):
        run.append(int(t))
    out.append(self.tokenizer.decode(run))
    return "".join(out)

  def parse(self, tokens: Sequence[int]) -> list[Message]:
    """Inverse of `render` on a full sample: the messages back from token ids."""
    by_id = {i: r for r, i in self.role_ids.items()}
    msgs, role, body = [], None, []
    for t in (int(t) for t in tokens):
      if t in by_id and role is None:
        role, body = by_id[t], []
      elif t == self.end_id and role is not None:
        msgs.append(Message(role, self.tokenizer.decode(body)))
        role = None
      elif role is not None:
        body.append(t)
    return msgs


def pack(samples: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int
         ) -> Iterator[dict[str, np.ndarray]]:
  """Packs (tokens, trained) samples into records of `seq_len` tokens.

  Each record: `tokens` [T], `targets` [T] (the next token; pad after a sample's
  last token), `loss_mask` [T] float32 (1 where the target is a trained token).
  A sample never straddles two records unless it is longer than `seq_len`; then it
  starts a record and continues into the following ones. Targets never cross from
  one sample into the next.
  """
  toks: list[int] = []
  tgts: list[int] = []
  mask: list[float] = []

  def flush() -> dict[str, np.ndarray]:
    n = len(toks)
    pad = seq_len - n
    rec = dict(tokens=np.asarray(toks + [pad_id] * pad, np.int32),
               targets=np.asarray(tgts + [pad_id] * pad, np.int32),
               loss_mask=np.asarray(mask + [0.0] * pad, np.float32))
    toks.clear(), tgts.clear(), mask.clear()
    return rec

  for tokens, trained in samples:
    tokens, trained = list(tokens), list(trained)
    t = tokens + [pad_id]  # the last token of a sample has no target
    s_tgts = t[1:]
    s_mask = [float(x) for x in trained[1:]] + [0.0]
    if len(tokens) <= seq_len and len(toks) + len(tokens) > seq_len:
      yield flush()
    if len(tokens) > seq_len and toks:
      yield flush()
    for i in range(len(tokens)):
      toks.append(tokens[i])
      tgts.append(s_tgts[i])
      mask.append(s_mask[i])
      if len(toks) == seq_len:
        yield flush()
  if toks:
    yield flush()


def pair_records(template: ChatTemplate, pairs: Iterable[PreferencePair], seq_len: int,
                 pad_id: int) -> Iterator[dict[str, np.ndarray]]:
  """One record per pair: the prompt + chosen and prompt + rejected sequences.

  Keys `chosen_tokens/targets/loss_mask` and `rejected_...` ([T] each), the loss
  mask covering the reply (text and `<|end|>`). Pairs longer than `seq_len` are
  cut from the left of the prompt (the reply is always whole) and counted by the
  caller via `fits`.
  """
  for pair in pairs:
    prompt = template.prompt(pair.prompt)
    rec = {}
    for name, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
      body = template.reply(reply.content)
      tokens = prompt + body
      trained = [False] * len(prompt) + [True] * len(body)
      if len(tokens) > seq_len:
        if len(body) >= seq_len:
          raise ChatFormatError(f"a {name} reply of {len(body)} tokens does not fit "
                                f"model.max_seq_len={seq_len}")
        cut = len(tokens) - seq_len
        tokens, trained = tokens[cut:], trained[cut:]
      (r,) = list(pack([(tokens, trained)], seq_len, pad_id))
      rec.update({f"{name}_{k}": v for k, v in r.items()})
    yield rec
