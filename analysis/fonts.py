"""Find an installed font that can draw the Chinese (``lang="zh"``) figure labels.

Matplotlib's default DejaVu Sans has no CJK glyphs and would draw empty boxes
("tofu"), so :func:`find_cjk_font` refuses rather than fall back silently:

1. known CJK families already in matplotlib's font list (Noto Sans CJK,
   Source Han Sans, WenQuanYi, Droid Sans Fallback, AR PL, SimHei, ...);
2. otherwise font files on the system whose name looks CJK (this also catches
   fonts installed after matplotlib built its font cache) are registered with
   matplotlib and step 1 is repeated.

Every candidate is checked to contain the glyphs actually used in the labels.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

from .errors import AnalysisError

CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
    "Noto Sans CJK JP", "Noto Sans CJK TC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN", "SimHei", "Microsoft YaHei",
    "PingFang SC", "Heiti SC", "Noto Serif CJK SC", "Source Han Serif SC",
)
CJK_FILE_HINTS = (
    "notosanscjk", "notoserifcjk", "notosanssc", "sourcehan", "wqy", "droidsansfallback",
    "uming", "ukai", "simhei", "msyh", "pingfang",
)
INSTALL_HINT = "`apt-get install fonts-noto-cjk` on Debian/Ubuntu (or fonts-wqy-zenhei, fonts-droid-fallback)"
_found: dict[str, str] = {}


def has_glyphs(font_file: str | Path, text: str) -> bool:
    """True when the font file maps every non-space character of ``text`` to a glyph."""
    try:
        font = FT2Font(str(font_file))
    except (OSError, RuntimeError, ValueError):
        return False
    return all(font.get_char_index(ord(c)) != 0 for c in set(text) if not c.isspace() and ord(c) > 127)


def _pick(sample: str) -> str | None:
    """First family of ``CJK_FAMILIES`` registered with matplotlib that has the glyphs of ``sample``."""
    by_name: dict[str, list[str]] = {}
    for entry in font_manager.fontManager.ttflist:
        by_name.setdefault(entry.name, []).append(entry.fname)
    for family in CJK_FAMILIES:
        if any(has_glyphs(fname, sample) for fname in by_name.get(family, [])):
            return family
    return None


def find_cjk_font(sample: str) -> str:
    """Family name of an installed font with every glyph of ``sample`` (preference: ``CJK_FAMILIES``).

    Raises :class:`AnalysisError` naming a package to install when there is none.
    """
    if sample in _found:
        return _found[sample]
    family = _pick(sample)
    if family is None:  # maybe installed after matplotlib cached its font list: register CJK-looking files
        known = {entry.fname for entry in font_manager.fontManager.ttflist}
        for fname in font_manager.findSystemFonts():
            flat = Path(fname).name.lower().replace("-", "").replace("_", "")
            if fname not in known and any(h in flat for h in CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(fname)
                except (OSError, RuntimeError, ValueError):
                    continue
        family = _pick(sample)
    if family is None:
        raise AnalysisError(
            f"lang='zh' needs a font with Chinese glyphs but none is installed "
            f"(looked for {', '.join(CJK_FAMILIES[:3])}, WenQuanYi, Droid Sans Fallback, ...); "
            f"install one, e.g. {INSTALL_HINT}, or use lang 'en'"
        )
    _found[sample] = family
    return family
