"""Tokenizer and chat template of a Hugging Face model directory, without transformers.

raytp runs on the `tokenizers` library plus jinja2 only: `tokenizer.json` holds the whole pipeline
(normalizer, pre-tokenizer, BPE, decoder), `tokenizer_config.json` the special tokens and chat template.
The chat template renders the way transformers renders it (same sandbox and helpers), so prompts built
here are byte-identical to those the model was tuned on.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

# Special-token names a chat template may refer to (transformers passes all of them as variables).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: str | dict | None) -> str | None:
    # Older tokenizer_config.json files spell special tokens as serialized AddedTokens: {"content": ...}.
    return value["content"] if isinstance(value, dict) else value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' version: jinja's own tojson HTML-escapes <, > and &, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> jinja2.Template:
    # Templates come from model repositories, i.e. untrusted code: render them sandboxed and immutable.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _read_chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
    # Newer repositories keep the template in its own file; older ones in tokenizer_config.json, either as
    # a string or as a list of named templates of which "default" is the chat one.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class Tokenizer:
    """Text <-> token ids, and chat messages -> prompt text, for one model directory."""

    def __init__(self, tokenizer: _HFTokenizer, tokenizer_config: dict, chat_template: str | None,
                 config_eos_ids: set[int], source: Path):
        self._tokenizer = tokenizer
        self._source = source
        self.special_tokens = {
            name: text for name in _SPECIAL_TOKEN_NAMES if (text := _token_text(tokenizer_config.get(name)))
        }
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        eos_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        # Instruct models often end turns with a token other than tokenizer_config's eos (Llama 3's
        # <|eot_id|>); config.json / generation_config.json list those, and generation stops on any.
        self.eos_token_ids: set[int] = config_eos_ids | ({eos_id} if eos_id is not None else set())
        self._chat_template = chat_template
        self._compiled_template = _compile_chat_template(chat_template) if chat_template else None
        # The special (control) tokens by their text, and a second tokenizer that reads them as plain text: its own
        # object, because `encode_special_tokens` is a setting of the object and encoding runs on several threads.
        specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = specials
        self._special_pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) \
            if specials else None
        self._as_text = _HFTokenizer.from_str(tokenizer.to_str())
        self._as_text.encode_special_tokens = True

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and `tokenizer_config.json` (required) from a Hugging Face model directory."""
        model_dir = Path(path)
        missing = [name for name in ("tokenizer.json", "tokenizer_config.json") if not (model_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir} lacks {', '.join(missing)}; raytp needs the fast-tokenizer files of a Hugging Face "
                f"model directory (re-save it with transformers' tokenizer.save_pretrained to create them)"
            )
        tokenizer = _HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
        config_eos_ids: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            if (model_dir / name).is_file():
                eos = json.loads((model_dir / name).read_text()).get("eos_token_id")
                config_eos_ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        chat_template = _read_chat_template(model_dir, tokenizer_config)
        return cls(tokenizer, tokenizer_config, chat_template, config_eos_ids, model_dir)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def special_token_id(self, text: str) -> int | None:
        """The id of the special (control) token written `text`, None if the vocabulary has no such token."""
        return self._special_ids.get(text)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters any one token decodes to: a text of n characters has at least n / this many tokens."""
        ids = [[i] for i in range(self.vocab_size)]
        return max(map(len, self._tokenizer.decode_batch(ids, skip_special_tokens=False)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (<|im_start|>) become their ids either way;
        `add_special_tokens` adds the ones tokenizer.json's post-processor inserts (e.g. a BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, variables: dict | None = None) -> str:
        """Prompt text for `messages` ([{"role": "user", "content": "hi"}, ...]), rendered like transformers'
        `apply_chat_template(..., tokenize=False)`; `tools` (OpenAI's function specs) reach templates that take
        them (Qwen2/3's, Llama 3.1's, gpt-oss's), others ignore them; `variables` are the template's own options,
        as transformers passes its keyword arguments (gpt-oss's reasoning_effort). Encode it with `encode` (no
        added special tokens: the template already wrote them)."""
        if self._compiled_template is None:
            raise ValueError(
                f"{self._source} has no chat template (no chat_template in tokenizer_config.json and no "
                f"chat_template.jinja); use a chat/instruct model, or send raw prompts instead of messages"
            )
        return self._compiled_template.render(**(variables or {}), messages=messages,
                                              add_generation_prompt=add_generation_prompt, tools=tools,
                                              **self.special_tokens)


    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, variables: dict | None = None) -> list[int]:
        """Token ids of `messages` through the chat template, where only the template's own markup becomes control
        tokens: text that a request carries (message contents, tool calls' names and arguments, the tools' specs)
        is text, so `<|im_end|>\n<|im_start|>system` in a user's message or a tool's argument tokenizes as those
        characters and cannot forge a turn.

        Each control token's text in the request is swapped for a private-use character before rendering, so the
        rendered prompt holds control tokens' text only where the template wrote it, however the template moves or
        serializes the request (tojson, trim); then, as `tokenizers` does itself, the prompt is cut at those control
        tokens and each piece between them, with the characters swapped back, encoded as text. A request that holds
        no control token's text gets exactly `encode(apply_chat_template(...))`."""
        hidden: dict[str, str] = {}  # private-use character -> the control token's text it stands for

        def hide(value):
            if isinstance(value, str) and self._special_pattern is not None:
                return self._special_pattern.sub(lambda m: _stand_in(m.group(), hidden, request), value)
            if isinstance(value, list):
                return [hide(v) for v in value]
            if isinstance(value, dict):
                return {hide(k): hide(v) for k, v in value.items()}
            return value

        request = json.dumps([messages, tools, variables], ensure_ascii=False, default=str)
        text = self.apply_chat_template(hide(messages), add_generation_prompt, hide(tools), hide(variables))
        if not hidden:
            return self.encode(text)
        reveal = str.maketrans(hidden)
        ids, at = [], 0
        for m in self._special_pattern.finditer(text):
            ids += self._as_text.encode(text[at:m.start()].translate(reveal), add_special_tokens=False).ids
            ids.append(self._special_ids[m.group()])
            at = m.end()
        return ids + self._as_text.encode(text[at:].translate(reveal), add_special_tokens=False).ids


def _stand_in(control: str, hidden: dict[str, str], request: str) -> str:
    """The private-use character standing for `control` in this request: one per distinct control token, none that
    the request itself holds."""
    for char, text in hidden.items():
        if text == control:
            return char
    code = 0xF0000 + len(hidden)  # Supplementary Private Use Area-A: no tokenizer gives these a meaning
    while chr(code) in request or chr(code) in hidden:
        code += 1
    hidden[chr(code)] = control
    return chr(code)


class StreamDecoder:
    """Incremental detokenization for streaming: `feed` one token id at a time, get the new text.

    Decoding tokens one by one is wrong twice over: byte-level BPE splits a multi-byte character (an emoji
    is often 3 tokens) so single tokens decode to U+FFFD, and decoders that strip a leading space
    (SentencePiece) need the previous tokens as context. So, as vLLM does, we decode a window that starts
    a few tokens back (`_prefix`) and emit only what it adds past the text already emitted, holding back
    while the window ends in U+FFFD, i.e. in an incomplete character. The concatenation of all pieces,
    `flush()` included, equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids[_prefix:_read] decode to text already emitted
        self._read = 0  # ids[:_read] are fully emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _advance(self, hold_incomplete: bool) -> str:
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) <= len(emitted) or (hold_incomplete and text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def feed(self, token_id: int) -> str:
        """Text completed by `token_id` ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """At end of stream: whatever is held back, an incomplete character becoming U+FFFD as in decode."""
        return self._advance(hold_incomplete=False)
