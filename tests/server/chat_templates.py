"""Chat templates in the styles of other model families, written for these tests and applied to the default
tokenizer (its own BOS/EOS stand in for the family's): Llama-2 [INST] with <<SYS>>, Llama-3 headers,
Mistral [INST] with the system prompt folded into the first instruction, and one that is not incremental."""

from __future__ import annotations

import copy
from typing import Any

LLAMA2 = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('roles must alternate user, assistant, user, ...') -}}
  {%- endif -%}
  {%- if m['role'] == 'user' -%}
    {%- if loop.first and system -%}
      {{- bos_token ~ '[INST] <<SYS>>\n' ~ system ~ '\n<</SYS>>\n\n' ~ (m['content'] | trim) ~ ' [/INST]' -}}
    {%- else -%}
      {{- bos_token ~ '[INST] ' ~ (m['content'] | trim) ~ ' [/INST]' -}}
    {%- endif -%}
  {%- else -%}
    {{- ' ' ~ (m['content'] | trim) ~ ' ' ~ eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

LLAMA3 = r"""
{{- bos_token -}}
{%- for m in messages -%}
  {{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\n\n' ~ (m['content'] | trim) ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

MISTRAL = r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] ~ '\n\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('roles must alternate user, assistant, user, ...') -}}
  {%- endif -%}
  {%- if m['role'] == 'user' -%}
    {{- '[INST] ' ~ (system if loop.first else '') ~ m['content'] ~ ' [/INST]' -}}
  {%- else -%}
    {{- m['content'] ~ eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

SYSTEM_LAST = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] ~ '\n\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if m['role'] == 'user' -%}
    {{- '[INST] ' ~ (system if loop.last else '') ~ m['content'] ~ '[/INST]' -}}
  {%- else -%}
    {{- m['content'] ~ eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""
"""Not incremental: the system prompt moves to the last instruction, so earlier turns render differently."""

TEMPLATES = {"chatml": None, "llama2": LLAMA2, "llama3": LLAMA3, "mistral": MISTRAL}


def with_template(tokenizer: Any, template: str | None) -> Any:
    """A copy of the tokenizer rendering with `template` (None: its own); the vocabulary is shared."""
    if template is None:
        return tokenizer
    tok = copy.copy(tokenizer)
    tok.chat_template = template
    return tok
