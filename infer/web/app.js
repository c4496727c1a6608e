// paliseg serve's page: upload an image and a prompt to /v1/segment, draw what comes back.
// Masks arrive as COCO compressed RLE (pycocotools' string form) at the image's full resolution; each object
// is drawn on a canvas of its own over the picture, its box and label as positioned elements.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"];
const $ = (id) => document.getElementById(id);
const state = { file: null, response: null, objects: [] };

// COCO compressed RLE string -> run lengths (pycocotools' rleFrString: 5 bits per character with a
// continuation bit, sign-extended, each count after the second stored as a difference to the one two before).
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let value = 0, k = 0, more = true, c = 0;
    while (more) {
      c = text.charCodeAt(p) - 48;
      value += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
    }
    if (c & 0x10) value -= 2 ** (5 * k);  // the last chunk's top bit is the sign
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

// {size: [h, w], counts} -> Uint8Array of h*w in row-major order (COCO runs are column-major, from 0s).
function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let index = 0;
  rleCounts(rle.counts).forEach((run, i) => {
    if (i % 2 === 1) {
      for (let j = index; j < index + run; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    }
    index += run;
  });
  return mask;
}

function colourBytes(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function maskCanvas(mask, width, height, colour) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  const [r, g, b] = colourBytes(colour);
  for (let i = 0; i < mask.length; i++) {
    if (mask[i]) pixels.data.set([r, g, b, 115], 4 * i);
  }
  context.putImageData(pixels, 0, 0);
  canvas.className = "mask";
  return canvas;
}

function percent(value, total) {
  return `${(100 * value) / total}%`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  $("drop-text").textContent = `${file.name} (${(file.size / 1024).toFixed(1)} KB)`;
  $("run").disabled = false;
  $("picture").src = URL.createObjectURL(file);
}

function render(response) {
  const { width, height } = response.image;
  const overlay = $("overlay");
  overlay.replaceChildren();
  $("objects").replaceChildren();
  state.objects = [];
  const picture = $("picture");
  picture.style.width = `${Math.min(900, Math.max(width, 480))}px`;  // small images are shown larger
  response.results.forEach((result) => {
    result.objects.forEach((object) => {
      const index = state.objects.length;
      const colour = COLOURS[index % COLOURS.length];
      const parts = [];
      const mask = object.mask ? decodeRle(object.mask) : null;
      if (mask) parts.push(maskCanvas(mask, width, height, colour));
      const [x1, y1, x2, y2] = object.box;
      const box = document.createElement("div");
      box.className = "box";
      Object.assign(box.style, { left: percent(x1, width), top: percent(y1, height), width: percent(x2 - x1, width),
                                 height: percent(y2 - y1, height), borderColor: colour });
      const tag = document.createElement("div");
      tag.className = "tag";
      Object.assign(tag.style, { left: percent(x1, width), top: percent(y1, height), background: colour });
      if (y1 < 0.08 * height) tag.classList.add("inside");  // no room above the box: the tag goes inside it
      const confidence = object.confidence === null ? "" : object.confidence.toFixed(2);
      tag.innerHTML = "<span class=label></span> <span class=confidence></span>";
      tag.querySelector(".label").textContent = object.label || result.prompt;
      tag.querySelector(".confidence").textContent = confidence;
      parts.push(box, tag);
      parts.forEach((part) => { part.dataset.object = index; overlay.append(part); });
      state.objects.push({ object, result, mask, parts, visible: true });

      const item = document.createElement("li");
      item.innerHTML = '<input type=checkbox checked><span class=swatch></span><span class=name></span><span class=meta></span>';
      item.querySelector(".swatch").style.background = colour;
      item.querySelector(".name").textContent = object.label || "(no label)";
      item.querySelector(".meta").textContent = `${confidence ? `conf ${confidence}, ` : ""}${object.area ?? 0} px`;
      const toggle = item.querySelector("input");
      toggle.dataset.object = index;
      toggle.addEventListener("change", () => {
        state.objects[index].visible = toggle.checked;
        state.objects[index].parts.forEach((part) => part.classList.toggle("hidden-object", !toggle.checked));
      });
      $("objects").append(item);
    });
  });
  const invalid = response.results.reduce((sum, r) => sum + r.invalid, 0);
  $("summary").textContent = `${state.objects.length} object(s) in ${width}×${height}` +
    (invalid ? `, ${invalid} invalid chunk(s) of the decoded text` : "");
  $("text").textContent = response.results.map((r) => `${r.prompt}\n${r.text || "(empty: no object)"}`).join("\n\n");
  $("result").hidden = false;
}

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function baseName() {
  const stem = state.file ? state.file.name.replace(/\.[^.]*$/, "") : "image";
  const prompt = state.response ? state.response.results[0].prompt : "prompt";
  return `${stem}.${prompt.toLowerCase().replace(/[^a-z0-9]+/g, "_").replace(/^_|_$/g, "") || "prompt"}`;
}

// The union of the shown objects' masks, 0/255 at full resolution (as `paliseg predict` writes masks/).
function saveMask() {
  const { width, height } = state.response.image;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const on = state.objects.some((o) => o.visible && o.mask && o.mask[i]);
    pixels.data.set([on ? 255 : 0, on ? 255 : 0, on ? 255 : 0, 255], 4 * i);
  }
  context.putImageData(pixels, 0, 0);
  canvas.toBlob((blob) => download(blob, `${baseName()}.png`), "image/png");
}

async function segment(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!state.file || !prompt) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("prompt", prompt);
  $("run").disabled = true;
  setStatus("segmenting…");
  const started = performance.now();
  try {
    const reply = await fetch("v1/segment", { method: "POST", body: form });
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.error || `HTTP ${reply.status}`);
    state.response = body;
    render(body);
    setStatus(`done in ${((performance.now() - started) / 1000).toFixed(2)} s`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("run").disabled = false;
  }
}

async function describe() {
  try {
    const info = await (await fetch("v1/info")).json();
    $("model").textContent = `${info.model} · VAE ${info.vae ? info.vae.sha256.slice(0, 12) : "?"}` +
      ` · ${info.image_size} px input · batches of up to ${Math.max(...info.batch_sizes)}`;
    info.prompts.forEach((prompt) => {
      const option = document.createElement("option");
      option.value = prompt;
      $("prompts").append(option);
    });
    if (info.prompts.length && !$("prompt").value) $("prompt").placeholder = info.prompts[0];
  } catch (error) {
    $("model").textContent = `cannot reach the server: ${error.message}`;
  }
}

$("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  chooseFile(event.dataTransfer.files[0]);
});
$("ask").addEventListener("submit", segment);
$("save-mask").addEventListener("click", saveMask);
$("save-json").addEventListener("click", () =>
  download(new Blob([JSON.stringify(state.response, null, 2)], { type: "application/json" }), `${baseName()}.json`));
window.paliseg = { decodeRle, state };  // for the browser test and the curious
describe();
