"""The Personas tab's gallery pictures: each persona's avatar as a thumbnail, or a placeholder.

Avatars are files in the personas folder, which anyone who can write there
controls: a hostile or broken image must give the placeholder, never an error
that breaks the tab (tests/test_hardening_files.py).
"""

from __future__ import annotations

import colorsys
import hashlib

from PIL import Image, ImageDraw, ImageFont

from ..personas import MAX_AVATAR_PIXELS, LoadedPersona, open_plain_file

THUMB = 160


def placeholder(persona_id: str, name: str) -> Image.Image:
    """A coloured square with the persona's initials, for personas without an avatar."""
    hue = int(hashlib.sha256(persona_id.encode()).hexdigest()[:2], 16) / 255
    colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.35, 0.78))
    image = Image.new("RGB", (THUMB, THUMB), colour)
    initials = "".join(word[0] for word in name.split()[:2]).upper() or "?"
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=THUMB // 3)
    draw.text((THUMB / 2, THUMB / 2), initials, fill="white", font=font, anchor="mm")
    return image


def thumbnail(loaded: LoadedPersona) -> Image.Image:
    path = loaded.avatar_path
    if path is not None:
        try:
            with open_plain_file(path) as handle, Image.open(handle) as image:
                if image.width * image.height > MAX_AVATAR_PIXELS:  # checked before decoding anything
                    raise ValueError(f"{image.width}x{image.height} pixels")
                image.draft("RGB", (THUMB, THUMB))  # a JPEG decodes at a fraction of its size
                image = image.convert("RGB")
                image.thumbnail((THUMB, THUMB))
                return image
        except Exception:  # noqa: BLE001 - PIL raises OSError, ValueError (a text chunk over 1 MB),
            pass  # DecompressionBombError, SyntaxError... for hostile files; the placeholder says who it is
    return placeholder(loaded.id, loaded.persona.name)


def caption(loaded: LoadedPersona) -> str:
    tags = " ".join(f"#{t}" for t in loaded.persona.tags)
    return f"{loaded.persona.name}\n{tags}" if tags else loaded.persona.name
