"""Pure scoring and canvases (numpy/scipy/PIL/matplotlib; no jax, no torch).

`masks` (IoU, Dice at full resolution), `boxes` (matched box IoU and accuracy), `scoring` (one image),
`aggregate` (per prompt and overall), `report` (JSON/CSV/Markdown and plots), `canvas` (side-by-side
pictures). The conventions for invalid and empty predictions are in each module's docstring and in
`report.CONVENTIONS`.
"""
