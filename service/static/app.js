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
const apiKeyInput = $("#api-key");

const MAX_PREVIEW = 640; // preview width/height in CSS pixels
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
  captionList.replaceChildren();
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

async function loadModelInfo() {
  try {
    const response = await fetch("/model", { headers: authHeaders() });
    if (!response.ok) return;
    const info = await response.json();
    $("#model").textContent = `${info.id} · ${info.encoder.name} · ${info.vocab_size} words` +
      (info.attention ? " · attention" : "");
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
  const body = new FormData();
  body.append("image", currentFile, currentFile.name);
  body.append("method", methodSelect.value);
  for (const label of form.querySelectorAll("[data-methods]")) {
    const input = label.querySelector("input");
    if (!label.hidden && input.value !== "") body.append(input.name, input.value);
  }
  body.append("attention", $("#attention").checked ? "true" : "false");
  submitButton.disabled = true;
  setStatus("Captioning…");
  captionList.replaceChildren();
  drawImage();
  try {
    const response = await fetch("/caption", { method: "POST", body, headers: authHeaders() });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = data.error ? data.error.message : `HTTP ${response.status}`;
      setStatus(`Error ${response.status}: ${message}`, true);
      return;
    }
    showCaptions(data);
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  } finally {
    submitButton.disabled = false;
  }
});

function showCaptions(data) {
  const t = data.timing;
  const hint = data.attention_shape ? " Hover a word to see where the model looked." : "";
  setStatus(`${t.total_ms.toFixed(0)} ms (model ${t.model_ms.toFixed(0)} ms, batch of ${t.batch_size}) · ` +
    `${data.model_id}.${hint}`);
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
    item.append(words, score);
    captionList.append(item);
  }
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
