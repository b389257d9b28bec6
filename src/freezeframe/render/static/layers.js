/* The step scrubber of the layer view (docs/report.md, "Step scrubber"). Reads window.FF_TIMELINE
   (the timeline data of analyse/timeline.py): moving #step shows the frame's stage, epoch, batch and
   step in #step-label, each layer row's update size and its group's lr, and a line at that step on
   every .ff-timechart plotly chart (the chart's own shapes are kept). */
(function () {
  'use strict';
  var sec = document.getElementById('layers');
  var T = window.FF_TIMELINE;
  if (!sec || !T || !T.frames || !T.frames.step || !T.frames.step.length) return;
  var TYPED = {f4: Float32Array, f8: Float64Array, i4: Int32Array, i2: Int16Array, i1: Int8Array,
               u4: Uint32Array, u2: Uint16Array, u1: Uint8Array};

  function decode(v) {  // {dtype, bdata, shape} -> a typed array, or rows of them; else as is
    if (!v || typeof v !== 'object' || typeof v.bdata !== 'string' || !TYPED[v.dtype]) return v;
    var bin = atob(v.bdata), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var flat = new TYPED[v.dtype](bytes.buffer);
    var dims = v.shape ? String(v.shape).split(',').map(Number) : [flat.length];
    if (dims.length < 2) return flat;
    var rows = [];
    for (var r = 0; r < dims[0]; r++) rows.push(flat.subarray(r * dims[1], (r + 1) * dims[1]));
    return rows;
  }
  function num(x) { return x === null || x === undefined ? NaN : x; }

  var fr = T.frames, F = fr.step.length;
  var upd = decode(T.update) || [], lrs = decode(T.lr) || [], loss = decode(T.loss);
  var recorded = decode(T.recorded);
  var lo = T.range ? T.range[0] : 0, hi = T.range ? T.range[1] : 1;
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  var slider = document.getElementById('step'), label = document.getElementById('step-label');
  var note = document.getElementById('step-note'), play = document.getElementById('play');
  if (!slider || !label) return;
  sec.classList.add('ffl-js');
  slider.max = String(F - 1);

  var order = (sec.dataset.stages || '').split(',').filter(function (s) { return s !== ''; }).map(Number);
  var column = {};
  order.forEach(function (s, k) { column[s] = k; });

  // the last frame at or before each frame, in its stage, where an update was measured
  var last = new Int32Array(F);
  for (var f = 0; f < F; f++) {
    var rec = recorded ? !!recorded[f] : upd.some(function (row) { return !isNaN(row[f]); });
    last[f] = rec ? f : (f > 0 && fr.stage[f] === fr.stage[f - 1] ? last[f - 1] : -1);
  }

  var rows = Array.prototype.map.call(sec.querySelectorAll('.r[data-i]'), function (el) {
    var cells = el.querySelector('.s') ? el.querySelector('.s').children : [];
    var gs = (el.dataset.gs || '').split(',').map(function (x) { return x === '' ? -1 : +x; });
    return {el: el, i: +el.dataset.i, g: el.dataset.g === '' ? -1 : +el.dataset.g, gs: gs,
            states: Array.prototype.map.call(cells, function (c) { return c.className; }),
            bar: el.querySelector('.u > span'), text: el.querySelector('.u > em'), lr: el.querySelector('.l'),
            shown: null};
  });
  var cur = document.createElement('style');
  sec.appendChild(cur);

  function ratio(v) { return Math.pow(10, v).toExponential(1); }
  function lrText(x) {  // 0.01, 0.0033, 7.5e-6
    if (isNaN(x)) return '';
    return 'lr ' + (x !== 0 && Math.abs(x) < 1e-3 ? x.toExponential(1) : String(+x.toPrecision(2)));
  }
  function frameLabel(f) {
    var parts = ['stage ' + fr.stage[f]], binned = fr.step_last && fr.step_last[f] !== fr.step[f];
    if (fr.epoch[f] !== null && fr.epoch[f] !== undefined) {
      parts.push('epoch ' + fr.epoch[f]);
      if (fr.batch[f] !== null && fr.batch[f] !== undefined && !binned) parts.push('batch ' + fr.batch[f]);
    }
    parts.push(binned ? 'steps ' + fr.step[f] + '–' + fr.step_last[f] : 'step ' + fr.step[f]);
    return parts.join(' · ');
  }

  var shownStage = null;
  function show(f) {
    label.textContent = frameLabel(f);
    var src = last[f], k = column[fr.stage[f]];
    var words = [];
    if (src < 0) words.push('no update measured yet in this stage');
    else if (src !== f) words.push('update sizes as last measured, at step ' + fr.step[src]);
    var l = loss ? num(loss[f]) : NaN;
    if (!isNaN(l)) words.push('loss ' + l.toPrecision(3));
    if (note) note.textContent = words.join(' · ');
    if (shownStage !== k) {
      shownStage = k;
      cur.textContent = k === undefined ? '' :
        '#layers .s>:nth-child(' + (k + 1) + '){outline:2px solid #111;outline-offset:0}' +
        '#layers .bs>span:nth-child(' + (k + 1) + '){outline:2px solid #111}' +
        '#layers .stg[data-s="' + fr.stage[f] + '"]{background:#1d2b3a;color:#fff}';
    }
    for (var r = 0; r < rows.length; r++) {
      var row = rows[r], v = src >= 0 && upd[row.i] ? num(upd[row.i][src]) : NaN;
      var state = k === undefined ? '' : (row.states[k] || '');
      var width = 0, text, zero = false;
      if (v === -Infinity) { text = '0 (no update)'; zero = true; }
      else if (!isNaN(v)) { width = Math.max(2, Math.min(100, 100 * (v - lo) / (hi - lo))); text = ratio(v); }
      else text = state === 'st-fu' || state === 'st-fr' || state === 'st-cf' ? 'frozen' : '–';
      var g = k !== undefined && row.gs.length > k ? row.gs[k] : row.g;  // the group of this stage
      var lr = g >= 0 && lrs[g] ? lrText(num(lrs[g][f])) : '';
      var key = width + '|' + text + '|' + lr;
      if (key === row.shown) continue;
      row.shown = key;
      if (row.bar) { row.bar.style.width = (zero ? 4 : width * 0.55) + '%'; row.bar.className = zero ? 'z' : ''; }
      if (row.text) row.text.textContent = text;
      if (row.lr) row.lr.textContent = lr;
    }
    marker(f);
  }

  // ---- the marker line on every chart over steps
  var pending = null, waited = 0;
  function charts() { return Array.prototype.slice.call(document.querySelectorAll('.ff-timechart')); }
  function ready() {
    if (!window.Plotly) return false;
    var page = document.getElementById('ff-data');   // the report's page says when its charts are drawn
    if (page && document.body.dataset.ready !== '1') return false;
    return charts().every(function (d) { return !!d._fullLayout; });
  }
  function baseShapes(div) {
    if (!div.__ffBase) {
      var own = div.dataset.baseShapes ? JSON.parse(div.dataset.baseShapes)
                                       : ((div.layout && div.layout.shapes) || []);
      div.__ffBase = own.filter(function (s) { return s.name !== 'ff-marker'; });
    }
    return div.__ffBase;
  }
  function drawMarker() {
    var f = pending;
    pending = null;
    if (f === null) return;
    if (!ready()) {
      if (waited++ < 200) { pending = f; setTimeout(drawMarker, 50); }
      return;
    }
    var x = (fr.step[f] + (fr.step_last ? fr.step_last[f] : fr.step[f])) / 2;
    charts().forEach(function (div) {
      var line = {type: 'line', name: 'ff-marker', xref: 'x', yref: 'paper', x0: x, x1: x, y0: 0, y1: 1,
                  line: {color: '#d6336c', width: 2}};
      Plotly.relayout(div, {shapes: baseShapes(div).concat([line])});
    });
  }
  function marker(f) {
    var idle = pending === null;
    pending = f;
    if (idle) (window.requestAnimationFrame || setTimeout)(drawMarker);
  }

  // ---- controls
  var timer = null;
  function set(f) { slider.value = String(f); show(f); }
  function stop() {
    if (timer !== null) clearInterval(timer);
    timer = null;
    if (play) { play.textContent = '▶ play'; play.setAttribute('aria-pressed', 'false'); }
  }
  function start() {
    if (+slider.value >= F - 1) set(0);
    var stride = Math.max(1, Math.ceil(F / 400));     // the whole run in about 20 s
    timer = setInterval(function () {
      var n = Math.min(F - 1, +slider.value + stride);
      set(n);
      if (n >= F - 1) stop();
    }, 50);
    play.textContent = '❚❚ pause';
    play.setAttribute('aria-pressed', 'true');
  }
  slider.addEventListener('input', function () { show(+slider.value); });
  slider.addEventListener('change', function () { show(+slider.value); });
  if (play) play.addEventListener('click', function () { if (timer === null) start(); else stop(); });
  Array.prototype.forEach.call(sec.querySelectorAll('.stg[data-s]'), function (b) {
    b.addEventListener('click', function () {
      var s = +b.dataset.s;
      for (var f = 0; f < F; f++) if (fr.stage[f] === s) { stop(); set(f); return; }
    });
  });
  show(+slider.value || 0);
})();
