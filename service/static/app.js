// The captioner web page: plain browser JavaScript, no build step, no external resources.
"use strict";

const $ = (sel) => document.querySelector(sel);
const fileInput = $("#file");
const drop = $("#drop");
const canvas = $("#preview");
const ctx = canvas.getContext("2d");
const form = $("#options");
const methodSelect = $("#method");
const submitButton = $("#submit");
const statusLine = $("#status");
const captionList = $("#captions");
const tagList = $("#tags");
const abstainedNote = $("#abstained");
const minConfidenceInput = $("#min-confidence");
const apiKeyInput = $("#api-key");

// A caption's confidence is the calibrated probability that it is acceptable (close to how people described the
// photo). The bundled model's Flickr8k test captions under 0.2 (14 % of them) are acceptable 1 time in 5 and score
// CIDEr-D 0.29 against 0.65 for the rest; 70 % of coco-mini's (out of domain) fall under it. There the page says
// so in words, not only in a number. (At 0.5 it would flag 69 % of in-domain captions, many of them right.)
const LOW_CONFIDENCE = 0.2;

const MAX_PREVIEW = 640; // preview width/height in CSS pixels
// A large photo is scaled down here before it is sent, to this short side: twice the model's own
// resize (from GET /model), so the server's resize still does the final resampling. A 12-megapixel
// phone photo then uploads as ~100 KiB instead of several MiB, and never trips the byte limit.
let uploadShortSide = 600;
const SCALABLE_TYPES = ["image/jpeg", "image/png", "image/webp", "image/bmp"]; // not GIF: the server takes frame 0
let currentFile = null;
let currentImage = null; // HTMLImageElement of the chosen file

// --- image choice: file picker or drag and drop --------------------------------------------------

fileInput.addEventListener("change", () => {
  if (fileInput.files.length) chooseFile(fileInput.files[0]);
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) chooseFile(file);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") fileInput.click();
});

function chooseFile(file) {
  currentFile = file;
  clearResults();
  setStatus(`${file.name} (${Math.round(file.size / 1024)} KiB)`);
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    currentImage = image;
    const scale = Math.min(1, MAX_PREVIEW / Math.max(image.naturalWidth, image.naturalHeight));
    canvas.width = Math.round(image.naturalWidth * scale);
    canvas.height = Math.round(image.naturalHeight * scale);
    drawImage();
    $("#preview-box").hidden = false;
    $("#preview-note").textContent = "";
  };
  image.onerror = () => {
    // The browser cannot show it; the server may still caption it (e.g. TIFF), so keep the file.
    currentImage = null;
    $("#preview-box").hidden = true;
  };
  image.src = url;
  submitButton.disabled = false;
}

function drawImage() {
  if (!currentImage) return;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(currentImage, 0, 0, canvas.width, canvas.height);
  delete canvas.dataset.word;
}

// --- options: show only those of the chosen method; limits from the server's OpenAPI schema --------

function showMethodOptions() {
  const method = methodSelect.value;
  for (const label of form.querySelectorAll("[data-methods]")) {
    label.hidden = !label.dataset.methods.split(" ").includes(method);
  }
}
methodSelect.addEventListener("change", showMethodOptions);
showMethodOptions();

async function loadLimits() {
  try {
    const spec = await (await fetch("/openapi.json")).json();
    for (const param of spec.paths["/caption"].post.parameters || []) {
      const input = form.querySelector(`input[name="${param.name}"]`);
      const schema = param.schema || {};
      const bounds = schema.anyOf ? schema.anyOf.find((s) => s.type !== "null") || {} : schema;
      if (!input) continue;
      if (bounds.minimum !== undefined) input.min = bounds.minimum;
      if (bounds.maximum !== undefined) input.max = bounds.maximum;
      if (param.description) input.title = param.description;
    }
  } catch (err) {
    // Limits are a convenience; the server validates every option anyway.
  }
}

// What a model knows is what it was trained on: said before its first caption, so nobody takes a
// caption of a photo far from that data at face value.
const DOMAINS = {
  flickr8k: "Flickr8k: people, dogs, sports and outdoor scenes. Other photos (food, rooms, vehicles, " +
    "objects) get poor captions",
  coco: "COCO: everyday scenes with people, animals, vehicles, food and household objects",
};

function showDomain(training) {
  const note = $("#model-domain");
  const format = training && typeof training === "object" ? String(training.format || "") : "";
  const known = DOMAINS[format.startsWith("coco") ? "coco" : format];
  note.textContent = known ? `Trained on ${known}.` :
    "What this model describes well depends on the photos it was trained on.";
  note.hidden = false;
}

async function loadModelInfo() {
  try {
    const response = await fetch("/model", { headers: authHeaders() });
    if (!response.ok) return;
    const info = await response.json();
    const preprocess = info.encoder && info.encoder.preprocess;
    if (preprocess && preprocess.resize) uploadShortSide = 2 * preprocess.resize;
    $("#model").textContent = `${info.id} · ${info.encoder.name} · ${info.vocab_size} words` +
      (info.attention ? " · attention" : "") + (info.confidence ? " · confidence" : "");
    showDomain(info.training_data);
    // Abstaining needs confidences: a model without a calibration would refuse any min confidence above 0.
    minConfidenceInput.disabled = !info.confidence;
    if (!info.confidence) {
      minConfidenceInput.value = "0";
      minConfidenceInput.title = "this model has no confidence calibration";
    }
  } catch (err) {
    // The page works without it.
  }
}

apiKeyInput.value = sessionStorage.getItem("captioner-api-key") || "";
apiKeyInput.addEventListener("change", () => {
  sessionStorage.setItem("captioner-api-key", apiKeyInput.value);
  loadModelInfo();
});

function authHeaders() {
  return apiKeyInput.value ? { "X-API-Key": apiKeyInput.value } : {};
}

// --- captioning -----------------------------------------------------------------------------------

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!currentFile) return;
  submitButton.disabled = true;
  clearResults();
  drawImage();
  try {
    const upload = await scaledUpload();
    const body = new FormData();
    body.append("image", upload.blob, upload.name);
    const method = methodSelect.value;
    body.append("method", method);
    // Only the options this method uses: the server refuses any other, whatever its value.
    for (const label of form.querySelectorAll("[data-methods]")) {
      const input = label.querySelector("input");
      const used = label.dataset.methods.split(" ").includes(method);
      if (used && !input.disabled && input.value !== "") body.append(input.name, input.value);
    }
    body.append("attention", $("#attention").checked ? "true" : "false");
    setStatus("Captioning…" + upload.note);
    const response = await fetch("/caption", { method: "POST", body, headers: authHeaders() });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = data.error ? data.error.message : `HTTP ${response.status}`;
      setStatus(`Error ${response.status}: ${message}`, true);
      return;
    }
    showCaptions(data, upload.note);
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  } finally {
    submitButton.disabled = false;
  }
});

async function scaledUpload() {
  // The chosen file as it is, or, when it is a large photo the browser can draw, a JPEG scaled to
  // uploadShortSide (upright: the browser applies the EXIF orientation when drawing).
  const original = { blob: currentFile, name: currentFile.name, note: "" };
  if (!currentImage || !SCALABLE_TYPES.includes(currentFile.type)) return original;
  const width = currentImage.naturalWidth;
  const height = currentImage.naturalHeight;
  const scale = uploadShortSide / Math.min(width, height);
  if (scale > 0.75) return original; // already about the size the model needs
  const out = document.createElement("canvas");
  out.width = Math.max(1, Math.round(width * scale));
  out.height = Math.max(1, Math.round(height * scale));
  const outCtx = out.getContext("2d");
  outCtx.fillStyle = "#fff"; // transparent pixels become white, as the server composites them
  outCtx.fillRect(0, 0, out.width, out.height);
  outCtx.imageSmoothingQuality = "high";
  outCtx.drawImage(currentImage, 0, 0, out.width, out.height);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/jpeg", 0.92));
  if (!blob || blob.size >= currentFile.size) return original;
  const name = currentFile.name.replace(/\.[^.]*$/, "") + ".jpg";
  const note = ` (sent scaled to ${out.width}×${out.height}, ${Math.round(blob.size / 1024)} KiB)`;
  return { blob, name, note };
}

function showCaptions(data, note = "") {
  const t = data.timing;
  const hint = data.attention_shape ? " Hover a word to see where the model looked." : "";
  setStatus(`${t.total_ms.toFixed(0)} ms (model ${t.model_ms.toFixed(0)} ms, batch of ${t.batch_size}) · ` +
    `${data.model_id}${note}.${hint}`);
  for (const caption of data.captions) {
    const item = document.createElement("li");
    item.className = "caption" + (caption.attention ? " has-attention" : "");
    const words = document.createElement("span");
    words.className = "words";
    caption.tokens.forEach((token, i) => {
      const word = document.createElement("span");
      word.className = "word";
      word.textContent = token;
      if (caption.attention) {
        word.addEventListener("mouseenter", () => {
          word.classList.add("active");
          drawHeat(caption.attention[i], data.attention_shape, data.attention_region, i);
        });
        word.addEventListener("mouseleave", () => {
          word.classList.remove("active");
          drawImage();
        });
      }
      words.append(word, " ");
    });
    if (!caption.tokens.length) words.textContent = "(empty caption)";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${caption.score.toFixed(3)} · log p ${caption.log_prob.toFixed(3)}`;
    item.append(words, confidenceBadge(caption.confidence), score);
    if (caption.confidence !== null && caption.confidence < LOW_CONFIDENCE) item.classList.add("low");
    captionList.append(item);
  }
  if (data.abstained) {
    const bar = percent(data.options.min_confidence);
    abstainedNote.textContent = `The model abstained: no caption reached the minimum confidence of ${bar}.`;
    abstainedNote.hidden = false;
  }
  showTags(data.tags || []);
}

function percent(value) {
  return `${Math.round(value * 100)} %`;
}

// "83 %", or, below LOW_CONFIDENCE, "27 % · low confidence — likely wrong"; nothing when the model has no
// confidence calibration (the API answers null: the page never invents a number).
function confidenceBadge(confidence) {
  const badge = document.createElement("span");
  badge.className = "confidence";
  if (confidence === null || confidence === undefined) return badge;
  const low = confidence < LOW_CONFIDENCE;
  badge.textContent = percent(confidence) + (low ? " · low confidence — likely wrong" : "");
  badge.title = "calibrated probability that this caption is acceptable";
  return badge;
}

function showTags(tags) {
  for (const tag of tags) {
    const item = document.createElement("li");
    item.className = "tag";
    const name = document.createElement("span");
    name.className = "tag-name";
    name.textContent = tag.name;
    const share = document.createElement("span");
    share.className = "tag-confidence";
    share.textContent = percent(tag.confidence);
    item.append(name, " ", share);
    if (tag.parents.length) {
      item.title = tag.parents.join(" › ");
      const parents = document.createElement("small");
      parents.className = "tag-parents";
      parents.textContent = tag.parents.join(", ");
      item.append(" ", parents);
    }
    tagList.append(item);
  }
  $("#tags-box").hidden = !tags.length;
}

function clearResults() {
  captionList.replaceChildren();
  tagList.replaceChildren();
  $("#tags-box").hidden = true;
  abstainedNote.hidden = true;
}

// Paint one word's attention weights (an h*w grid over the encoder's centre crop) over the preview.
function drawHeat(weights, shape, region, wordIndex) {
  if (!currentImage || !weights || !shape) return;
  drawImage();
  const [h, w] = shape;
  const grid = document.createElement("canvas");
  grid.width = w;
  grid.height = h;
  const gctx = grid.getContext("2d");
  const pixels = gctx.createImageData(w, h);
  const max = Math.max(...weights) || 1;
  for (let k = 0; k < h * w; k++) {
    const v = weights[k] / max;
    pixels.data[4 * k] = 255;
    pixels.data[4 * k + 1] = Math.round(220 * (1 - v));
    pixels.data[4 * k + 2] = 0;
    pixels.data[4 * k + 3] = Math.round(40 + 170 * v);
  }
  gctx.putImageData(pixels, 0, 0);
  const r = region || { left: 0, top: 0, width: 1, height: 1 };
  const x = r.left * canvas.width, y = r.top * canvas.height;
  const cw = r.width * canvas.width, ch = r.height * canvas.height;
  // Dim what the encoder never saw (outside its centre crop), then blend the smoothed heat map in.
  ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
  ctx.fillRect(0, 0, canvas.width, y);
  ctx.fillRect(0, y + ch, canvas.width, canvas.height - y - ch);
  ctx.fillRect(0, y, x, ch);
  ctx.fillRect(x + cw, y, canvas.width - x - cw, ch);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(grid, x, y, cw, ch);
  canvas.dataset.word = String(wordIndex);
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

loadLimits();
loadModelInfo();
