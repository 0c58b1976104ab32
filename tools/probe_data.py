"""Labelled probe sets from the real data of .ci/setup (docs/evaluation.md), written under data/eval/.

  python tools/probe_data.py [text] [digits] [audio] [lang]      (default: all four)

text    data/text/kjv.txt -> every 10th chapter (chapters 10, 20, ... in Bible order, 118 in
        all) is held out of pretraining: data/eval/kjv_pretrain.txt is the KJV without them
        (same format), and their verses become two probe TSVs (`verse<TAB>label`):
        kjv_testament.tsv (OT / NT) and kjv_group.tsv (8 book groups: law, history, wisdom,
        major / minor prophets, gospels + Acts, Pauline letters, general letters + Revelation).
digits  scikit-learn's load_digits (1797 8x8 handwritten digits), upscaled to 64 px RGB PNGs
        (bilinear), a folder per digit: data/eval/digits/<0..9>/.
audio   data/audio/prompts (Asterisk prompts, .ci/data/audio.sh) -> data/eval/prompt_words/
        <class>/ symlinks by the prompt's source directory: digits (numbers, days, months:
        "digits/*"), letters ("letters/*": spelled letters and symbols), phonetic (NATO
        alphabet "phonetic/*"), and voicemail (whole sentences, "vm-*").
lang    held-out spoken language ID: the Asterisk prompts in 5 languages (en: data/audio/prompts;
        es / fr / it / ru: data/audio/lang/<lang>, .ci/data/lang.sh). The same prompt name is
        the same sentence in every language, so the split is by prompt name: a name is a probe
        name when it exists in all 5 languages, is speech (no beeps / tones), lasts at least
        LANG_MIN_SECONDS in each, and crc32(name) % LANG_PROBE_EVERY == 0. Probe:
        data/eval/lang_id/<lang>/<name>.wav (balanced: every probe name in every language);
        pretraining: data/eval/lang_pretrain/<lang>_<name>.wav, every other prompt of every
        language, so no sentence of the probe (in any language) is seen in pretraining.
        Empty files (ru/is.g722 is 0 bytes in the package) are left out of both.
        data/eval/lang_split.json lists both. Voices: en and es are the same speaker (Allison),
        fr / it / ru one speaker each (it male): the probe mixes language and speaker
        identity, except en vs es.
Idempotent: existing outputs are rewritten from scratch.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data", "eval")

GROUPS = [
    ("law", "Genesis Exodus Leviticus Numbers Deuteronomy"),
    ("history", "Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings 1_Chronicles 2_Chronicles "
                "Ezra Nehemiah Esther"),
    ("wisdom", "Job Psalms Proverbs Ecclesiastes Song_of_Solomon"),
    ("major_prophets", "Isaiah Jeremiah Lamentations Ezekiel Daniel"),
    ("minor_prophets", "Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai "
                       "Zechariah Malachi"),
    ("gospels_acts", "Matthew Mark Luke John Acts"),
    ("pauline", "Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians "
                "1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon"),
    ("general_revelation", "Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"),
]
GROUP_OF = {b.replace("_", " "): g for g, books in GROUPS for b in books.split()}
NT_START = "Matthew"
HOLD_EVERY = 10


def parse_kjv(path: str):
  """-> list of chapters: (book, chapter, [raw lines incl. header], [verse texts])."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  chapters, cur = [], None
  header = re.compile(r"^(\S.*) (\d+)$")
  verse = re.compile(r"^\s+(\d+) (.*)$")
  for i, line in enumerate(lines):
    prev_blank = i == 0 or not lines[i - 1].strip()
    next_blank = i + 1 >= len(lines) or not lines[i + 1].strip()
    m = header.match(line)
    if m and prev_blank and next_blank and m.group(1) in GROUP_OF:
      cur = (m.group(1), int(m.group(2)), [], [])
      chapters.append(cur)
    if cur is None:
      continue
    cur[2].append(line)
    v = verse.match(line)
    if v:
      cur[3].append(v.group(2).strip())
    elif line.strip() and not m and cur[3]:
      cur[3][-1] += " " + line.strip()
  return chapters


def text() -> None:
  chapters = parse_kjv(os.path.join(ROOT, "data", "text", "kjv.txt"))
  books = list(dict.fromkeys(c[0] for c in chapters))
  if len(books) != 66 or set(books) != set(GROUP_OF):
    raise SystemExit(f"expected the 66 KJV books, parsed {len(books)}: check data/text/kjv.txt")
  nt = books.index(NT_START)
  keep, held = [], []
  for n, ch in enumerate(chapters, 1):
    (held if n % HOLD_EVERY == 0 else keep).append(ch)
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "kjv_pretrain.txt"), "w", encoding="utf-8") as f:
    for ch in keep:
      f.write("\n".join(ch[2]).rstrip("\n") + "\n\n")
  rows = [(v, books.index(b) >= nt, GROUP_OF[b]) for b, _, _, verses in held for v in verses]
  with open(os.path.join(OUT, "kjv_testament.tsv"), "w", encoding="utf-8") as f:
    f.writelines(f"{v}\t{'NT' if is_nt else 'OT'}\n" for v, is_nt, _ in rows)
  with open(os.path.join(OUT, "kjv_group.tsv"), "w", encoding="utf-8") as f:
    f.writelines(f"{v}\t{g}\n" for v, _, g in rows)
  n_verses = sum(len(c[3]) for c in chapters)
  print(f"text: {len(chapters)} chapters / {n_verses} verses; pretrain {len(keep)} chapters; "
        f"probe {len(held)} held-out chapters / {len(rows)} verses "
        f"({sum(r[1] for r in rows)} NT) -> {OUT}")


def digits(size: int = 64) -> None:
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_digits
  d = load_digits()
  out = os.path.join(OUT, "digits")
  shutil.rmtree(out, ignore_errors=True)
  for i, (img, y) in enumerate(zip(d.images, d.target)):
    cls = os.path.join(out, str(y))
    os.makedirs(cls, exist_ok=True)
    g = (255 - img * 255 / 16).astype(np.uint8)  # dark ink on white, like a scanned page
    Image.fromarray(g).convert("RGB").resize((size, size), Image.BILINEAR).save(
        os.path.join(cls, f"{i:04d}.png"))
  print(f"digits: {len(d.images)} images at {size} px -> {out}")


AUDIO_CLASSES = (("digits", "digits_"), ("letters", "letters_"), ("phonetic", "phonetic_"),
                 ("voicemail", "vm-"))


def audio() -> None:
  src = os.path.join(ROOT, "data", "audio", "prompts")
  if not os.path.isdir(src):
    raise SystemExit(f"{src} missing: run .ci/setup (.ci/data/audio.sh)")
  out = os.path.join(OUT, "prompt_words")
  shutil.rmtree(out, ignore_errors=True)
  counts = {}
  for name in sorted(os.listdir(src)):
    for cls, prefix in AUDIO_CLASSES:
      if name.startswith(prefix) and name.endswith(".wav"):
        os.makedirs(os.path.join(out, cls), exist_ok=True)
        os.symlink(os.path.join(src, name), os.path.join(out, cls, name))
        counts[cls] = counts.get(cls, 0) + 1
  print(f"audio: {counts} -> {out}")


LANG_DIRS = {"en": os.path.join("data", "audio", "prompts"),
             **{lang: os.path.join("data", "audio", "lang", lang) for lang in ("es", "fr", "it", "ru")}}
LANG_NONSPEECH = re.compile(r"(beep|tone|^tt-monkeys$)")
LANG_MIN_SECONDS = 1.0
LANG_PROBE_EVERY = 3


def wav_seconds(path: str) -> float:
  import wave
  with wave.open(path) as w:
    return w.getnframes() / w.getframerate()


def lang_split(dirs: dict) -> tuple[list[str], dict]:
  """-> (probe names, {lang: {name: path}}) for the language-ID probe (see module doc)."""
  import zlib
  files = {}
  for lang, d in dirs.items():
    if not os.path.isdir(d):
      raise SystemExit(f"{d} missing: run .ci/setup (.ci/data/audio.sh, .ci/data/lang.sh)")
    files[lang] = {n[:-4]: os.path.join(d, n) for n in sorted(os.listdir(d))
                   if n.endswith(".wav") and wav_seconds(os.path.join(d, n)) > 0}  # ru/is: empty
  common = sorted(set.intersection(*(set(f) for f in files.values())))
  probe = [n for n in common
           if zlib.crc32(n.encode()) % LANG_PROBE_EVERY == 0 and not LANG_NONSPEECH.search(n)
           and all(wav_seconds(files[lang][n]) >= LANG_MIN_SECONDS for lang in files)]
  return probe, files


def lang() -> None:
  import json
  probe, files = lang_split({lang: os.path.join(ROOT, d) for lang, d in LANG_DIRS.items()})
  held = set(probe)
  out_probe, out_pre = os.path.join(OUT, "lang_id"), os.path.join(OUT, "lang_pretrain")
  for d in (out_probe, out_pre):
    shutil.rmtree(d, ignore_errors=True)
  pretrain = []
  for lang, names in files.items():
    os.makedirs(os.path.join(out_probe, lang))
    for n, path in names.items():
      if n in held:
        os.symlink(path, os.path.join(out_probe, lang, n + ".wav"))
      else:
        os.makedirs(out_pre, exist_ok=True)
        os.symlink(path, os.path.join(out_pre, f"{lang}_{n}.wav"))
        pretrain.append(f"{lang}_{n}")
  with open(os.path.join(OUT, "lang_split.json"), "w") as f:
    json.dump({"probe_names": probe, "languages": list(files), "pretrain": pretrain,
               "rule": f"name in all languages, speech, >= {LANG_MIN_SECONDS} s in each, "
                       f"crc32(name) % {LANG_PROBE_EVERY} == 0"}, f, indent=1)
  secs = sum(wav_seconds(os.path.join(out_pre, n + ".wav")) for n in pretrain)
  print(f"lang: probe {len(probe)} prompts x {len(files)} languages -> {out_probe}; pretrain "
        f"{len(pretrain)} clips ({secs / 60:.0f} min, no probe prompt in any language) -> {out_pre}")


if __name__ == "__main__":
  todo = sys.argv[1:] or ["text", "digits", "audio", "lang"]
  for t in todo:
    {"text": text, "digits": digits, "audio": audio, "lang": lang}[t]()
