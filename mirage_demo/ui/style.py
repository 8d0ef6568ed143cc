"""The page's look and behaviour on every screen: the style sheet and the page script.

One place for page-wide CSS (a projector at 1440x900 and a phone at 390x844) and for the few
things the page does in the browser that Gradio does not:

- a slider moved with the keyboard (arrow keys, Page Up/Down, Home, End) applies its value
  when the key is released, as a mouse release does; Enter in a slider's number box applies
  what was typed, as Tab does (Gradio listens for ``pointerup`` and ``blur`` only);
- a gallery thumbnail, which Gradio shows with an empty ``alt``, gets its caption as ``alt``;
- :func:`scroll_to_js`: a button that names a place in another tab lands on it.

Phone layout: the banner is one line (its details open on demand), the model picker is full
width, the tab bar scrolls sideways, tables scroll instead of breaking words, and a view can
put its parts in the order a phone needs with the ``ph-1`` ... ``ph-9`` classes: inside a row
marked ``ph-flat``, the columns dissolve and the parts are stacked in that order.
"""

from __future__ import annotations

import json

__all__ = ["CSS", "JS", "PHONE", "TABS_ID", "scroll_to_js"]

#: The phone layout applies below this width (CSS pixels).
PHONE = 640
#: The element id of the tab bar (a link to a tab's top lands on it).
TABS_ID = "tabs"

CSS = (
    """
.disclaimer {border-left: 4px solid #d97706; padding: 6px 12px; background: #fffbeb;}
.disclaimer p {margin: 0; color: #78350f;}
.model-banner summary {cursor: pointer; color: #78350f;}
.model-banner[open] summary {margin-bottom: 0.4em;}
.model-banner p {margin: 0 0 0.4em 0;}
footer {visibility: hidden}
.explorer-matrix [role=gridcell], .explorer-matrix [role=columnheader] {
  font-size: 1.2rem; min-height: 2.6rem; align-items: center;
}
.explorer-matrix [role=gridcell] {cursor: pointer;}
.teach-big p, .teach-big li {font-size: 1.15rem;}
/* tables scroll sideways instead of breaking words ("NO RM AL") */
.prose table {
  display: block; width: max-content; max-width: 100%; overflow-x: auto; border: none !important;
}
.prose th, .prose td {word-break: normal; overflow-wrap: normal; hyphens: none;}
#compare-table th, #compare-table th * {
  word-break: normal !important; overflow-wrap: normal !important;  /* headers: whole words */
}
.colour-bar {display: flex; align-items: center; gap: 0.5em; font-size: 0.85rem;}
.colour-bar .bar {flex: 1; height: 0.8em; border-radius: 3px; border: 1px solid #94a3b8;}
/* a gallery as tall as its pictures (no empty space under a row of thumbnails) */
.compact-gallery .grid-wrap, .examples-strip .grid-wrap {
  min-height: 0 !important; max-height: none !important; overflow: visible !important;
}
/* the example scans: one row of thumbnails, no captions (their alt text names them) */
.examples-strip .grid-container {
  grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important;
}
.examples-strip .thumbnail-item {aspect-ratio: 1 / 1; height: auto !important;}
.examples-strip .caption-label {display: none;}
.examples-strip label[data-testid=block-label] {position: static; margin-bottom: 4px;}
.examples-strip .grid-container {padding-top: 0 !important;}
.model-banner .narrow {display: none;}
.phone-hint {display: none;}  /* a line only a phone needs (shown below) */
"""
    + f"""
@media (max-width: {PHONE}px) {{
  .gradio-container {{padding-left: 6px !important; padding-right: 6px !important;}}
  .app-title h1 {{font-size: 1.35rem; margin: 0 0 0.2em 0;}}
  .app-title p {{font-size: 0.9rem; margin: 0;}}
  /* the header: picker above the banner, both full width; the banner one line */
  .header-row {{flex-direction: column !important; gap: 6px !important;}}
  .header-row > * {{min-width: 100% !important; width: 100% !important;}}
  .model-banner summary {{
    white-space: nowrap; overflow: hidden; text-overflow: ellipsis; font-size: 0.9rem;
  }}
  .disclaimer {{padding: 4px 8px;}}
  /* every tab reachable: the tab bar scrolls sideways */
  [role=tablist] {{
    flex-wrap: nowrap !important; overflow-x: auto; overflow-y: hidden;
    scrollbar-width: thin; -webkit-overflow-scrolling: touch;
  }}
  [role=tablist] > button {{flex: 0 0 auto; white-space: nowrap;}}
  .prose th, .prose td {{white-space: nowrap;}}
  .explorer-matrix [role=gridcell], .explorer-matrix [role=columnheader] {{
    font-size: 0.75rem; min-height: 2.2rem;
  }}
  .explorer-matrix .cell-menu-button {{display: none;}}
  /* every row stacks its parts full width (a row marked keep-row stays a row) */
  .row:not(.keep-row) > * {{flex: 1 1 100% !important; min-width: 100% !important;}}
  /* a view's parts in the order a phone needs (classes ph-1 ... ph-9) */
  .ph-flat {{flex-direction: column !important;}}
  .ph-flat > .column {{display: contents !important;}}
  .ph-flat > .column > * {{width: 100% !important; min-width: 100% !important;}}
  .phone-short {{min-height: 160px;}}
  .teach-big p, .teach-big li {{font-size: 1rem;}}  /* large for a projector, not a phone */
"""
    + "".join(  # a form field sits in a .form wrapper: order the wrapper
        f"  .ph-flat .ph-{n}, .ph-flat .form:has(> .ph-{n}) {{order: {n};}}\n" for n in range(1, 10)
    )
    + """
  .phone-short img, .phone-short .image-frame {max-height: 210px;}
  .phone-short, .phone-short .image-container, .phone-short .upload-container {
    height: auto !important; max-height: 230px;
  }
  .examples-strip .grid-container {
    grid-template-columns: repeat(var(--grid-cols), 60px) !important; overflow-x: auto;
    padding-bottom: 4px;
  }
  .model-banner .narrow {display: inline;}
  .phone-hint {display: block;}
  #compare-maps label[data-testid=block-label] {position: static; margin-bottom: 4px;}
  #compare-maps .grid-container {padding-top: 0 !important;}
  .model-banner .wide, .model-banner .banner-name {display: none;}
}
"""
)

#: Run once when the page loads (``demo.launch(js=JS)``).
JS = """
() => {
  const KEYS = new Set(["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown",
                        "PageUp", "PageDown", "Home", "End"]);
  document.addEventListener("keyup", (event) => {
    const el = event.target;
    if (el instanceof HTMLInputElement && el.type === "range" && KEYS.has(event.key)) {
      el.dispatchEvent(new PointerEvent("pointerup", {bubbles: true}));
    }
  }, true);
  document.addEventListener("keydown", (event) => {
    const el = event.target;
    if (el instanceof HTMLInputElement && el.type === "number" && event.key === "Enter"
        && el.dataset.testid === "number-input") {
      el.dispatchEvent(new FocusEvent("blur"));
    }
  }, true);
  const describe = () => {
    for (const img of document.querySelectorAll("img[alt=''][title]")) img.alt = img.title;
  };
  new MutationObserver(describe).observe(document.body, {
    subtree: true, childList: true, attributes: true, attributeFilter: ["title", "src"],
  });
  describe();
  // the tab bar scrolls sideways on a phone: keep the chosen tab in sight
  document.addEventListener("click", (event) => {
    const tab = event.target.closest && event.target.closest("[role=tab]");
    if (tab) setTimeout(() => tab.scrollIntoView({block: "nearest", inline: "nearest"}), 50);
  }, true);
}
"""


def scroll_to_js(elem_id: str | None = None) -> str:
    """Browser code that scrolls the element ``elem_id`` (``None``: the id given as the
    event's first input) into view once its tab shows it, opening it if it is a closed
    accordion, and again while the page above it settles (lazy pictures load and push it);
    run after the tab is selected: ``.then(None, js=scroll_to_js(...))``."""
    target = json.dumps(elem_id) if elem_id is not None else "given"
    return f"""
(given) => {{
  let tries = 0, last = null, still = 0;
  const go = () => {{
    const el = document.getElementById({target});
    if (el && el.offsetParent !== null) {{
      const header = el.querySelector(":scope > button.label-wrap:not(.open)");
      if (header) header.click();  // a closed accordion: open it
      const top = Math.round(el.getBoundingClientRect().top);
      if (top !== 0 || last === null) el.scrollIntoView({{block: "start"}});
      still = top === last ? still + 1 : 0;
      last = Math.round(el.getBoundingClientRect().top);
      if (still >= 4) return;  // it stayed put for a while: done
    }}
    if (++tries < 30) setTimeout(go, 100);  // at most 3 s
  }};
  go();
  return given;
}}
"""
