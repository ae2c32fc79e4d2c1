"""Charts drawn on the server as SVG text (no chart library, no script): numbers are
formatted here, labels escaped."""

from __future__ import annotations

from markupsafe import escape

W, H, PAD = 720, 240, 36


def hours(counts: list[int]) -> str:
    """Bars of card writes per UTC hour (24 counts)."""
    top = max(counts) or 1
    bar = (W - 2 * PAD) / 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
             f'class="chart" aria-label="card writes per hour">',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#888"/>',
             f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end" font-size="11">{top}</text>',
             f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end" font-size="11">0</text>']
    for hour, count in enumerate(counts):
        height = (H - 2 * PAD) * count / top
        x = PAD + hour * bar
        parts.append(f'<rect x="{x + 2:.1f}" y="{H - PAD - height:.1f}" width="{bar - 4:.1f}" '
                     f'height="{height:.1f}" fill="#2b6cb0"><title>{hour:02d}:00 UTC: {count}'
                     '</title></rect>')
        if count:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{H - PAD - height - 3:.1f}" '
                         f'text-anchor="middle" font-size="10">{count}</text>')
        if hour % 3 == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{H - PAD + 14}" text-anchor="middle" '
                         f'font-size="11">{hour:02d}</text>')
    parts.append(f'<text x="{W / 2}" y="{H - 4}" text-anchor="middle" font-size="11">'
                 'hour (UTC)</text></svg>')
    return "".join(parts)


def values(rows: list[tuple[str, int]]) -> str:
    """Horizontal bars of the amount (cents) per type."""
    if not rows:
        return '<p class="empty">no committed records this day</p>'
    top = max(abs(v) for _, v in rows) or 1
    height = 28 * len(rows) + 16
    label = 150
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" role="img" '
             'class="chart" aria-label="value by type">']
    for i, (kind, cents) in enumerate(rows):
        y = 8 + 28 * i
        width = (W - label - 140) * abs(cents) / top
        parts.append(f'<text x="{label - 8}" y="{y + 15}" text-anchor="end" font-size="12">'
                     f'{escape(kind)}</text>'
                     f'<rect x="{label}" y="{y}" width="{width:.1f}" height="20" '
                     f'fill="#38a169"/><text x="{label + width + 6:.1f}" y="{y + 15}" '
                     f'font-size="12">{escape(_money(cents))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _money(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100:,}.{cents % 100:02d}"
