// The operators' console: sign in with a token, list campaigns, create one, watch it live,
// pause, resume or end it, download its winners. Everything goes through /api/admin with
// Authorization: Bearer <token>; the token lives in this tab's sessionStorage only.
// Money arrives as integer fen and is formatted with integer arithmetic only.
(function () {
  'use strict';

  var TOKEN_KEY = 'hb-admin-token';
  var POLL_MS = 1000;
  var HISTORY = 120; // samples per chart: two minutes at one a second
  var PAGE_SIZE = 50;
  var SVG = 'http://www.w3.org/2000/svg';
  var STATES = {
    scheduled: '未开始 Scheduled', open: '进行中 Open', paused: '已暂停 Paused',
    sold_out: '已抢完 Sold out', ended: '已结束 Ended'
  };
  var KINDS = { red_packet: '红包 Red packet', lottery: '抽奖 Lottery' };
  var PAYOUT_STATES = {
    NEW: '待发放', ACCEPTED: '已受理', PROCESSING: '处理中', WAIT_USER_CONFIRM: '待用户确认',
    TRANSFERING: '转账中', SUCCESS: '已到账', FAIL: '失败', CANCELING: '撤销中', CANCELLED: '已撤销'
  };
  var ACTIONS = {
    pause: { text: '暂停活动 Pause campaign', note: '暂停期间玩家不能抢红包或抽奖。 Players cannot grab or draw while it is paused.' },
    resume: { text: '恢复活动 Resume campaign', note: '玩家可以继续参与。 Players may take part again.' },
    end: { text: '结束活动 End campaign', note: '结束后不能恢复。 This cannot be undone.' }
  };

  var $ = function (id) { return document.getElementById(id); };
  var views = ['signin', 'list', 'create', 'audit', 'live'];
  var list = { next: null, loading: false };
  var audit = { next: null, loading: false };
  // gen: one polling loop per opening of the live view (a reply from an older one is dropped).
  var live = { id: null, gen: 0, timer: 0, samples: [], stats: null, busy: false };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function yuan(fen) {
    var n = Math.trunc(Number(fen) || 0);
    var f = Math.abs(n);
    var whole = String((f - f % 100) / 100).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
    return (n < 0 ? '-' : '') + whole + '.' + String(f % 100).padStart(2, '0');
  }

  function count(n) { return String(Math.trunc(Number(n) || 0)).replace(/\B(?=(\d{3})+(?!\d))/g, ','); }

  function when(iso) {
    if (!iso) return '—';
    var d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString('zh-CN', { hour12: false });
  }

  function toast(text) {
    var t = $('toast');
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { t.hidden = true; }, 4000);
  }

  // ---- the API --------------------------------------------------------------------------

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }

  async function request(method, path, body) {
    var headers = { Authorization: 'Bearer ' + token(), Accept: 'application/json' };
    var init = { method: method, headers: headers, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    try {
      return await fetch(path, init);
    } catch (e) {
      return null;
    }
  }

  async function api(method, path, body) {
    var resp = await request(method, path, body);
    if (resp === null) return { status: 0, data: { error: 'network', message: '网络不通 Network unreachable' } };
    var data = {};
    try { data = await resp.json(); } catch (e) { data = {}; }
    if (resp.status === 401 && path.indexOf('/api/admin/') === 0) signOut('令牌无效或已失效，请重新登录 The token was refused; sign in again');
    return { status: resp.status, data: data };
  }

  function problem(res) {
    if (res.status === 403) return '此令牌只读，不能执行此操作 This token is read-only (viewer)';
    var code = res.data && res.data.error ? ' (' + res.data.error + ')' : '';
    return ((res.data && res.data.message) || 'HTTP ' + res.status) + code;
  }

  // ---- sign-in and routing ----------------------------------------------------------------

  function show(name) {
    views.forEach(function (v) { $('view-' + v).hidden = v !== name; });
    $('nav').hidden = name === 'signin';
    if (name !== 'live') stopLive();
  }

  function signOut(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    stopLive();
    show('signin');
    $('token-error').textContent = reason || '';
    $('token').value = '';
  }

  async function signIn(event) {
    event.preventDefault();
    var value = $('token').value.trim();
    $('token-error').textContent = '';
    if (!value) {
      $('token-error').textContent = '请输入令牌 Enter a token';
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    var res = await api('GET', '/api/admin/campaigns?limit=1');
    if (res.status === 401) return; // signOut has said why
    if (res.status !== 200) {
      sessionStorage.removeItem(TOKEN_KEY);
      $('token-error').textContent = problem(res);
      return;
    }
    $('token').value = '';
    route();
  }

  function route() {
    if (!token()) return show('signin');
    var hash = location.hash || '#/';
    var match = /^#\/c\/([^/]+)$/.exec(hash);
    if (match) return openLive(decodeURIComponent(match[1]));
    if (hash === '#/new') return openCreate();
    if (hash === '#/audit') return openAudit();
    return openList();
  }

  // ---- the campaign list --------------------------------------------------------------------

  function badge(state) {
    return el('span', { class: 'badge badge--' + state, 'data-state': state }, STATES[state] || state);
  }

  function listItem(c) {
    var li = el('li', { class: 'campaign', 'data-id': c.id });
    var a = el('a', { href: '#/c/' + encodeURIComponent(c.id), class: 'campaign__link' });
    var head = el('span', { class: 'campaign__head' });
    head.appendChild(el('span', { class: 'campaign__name' }, c.name));
    head.appendChild(badge(c.state));
    a.appendChild(head);
    var facts = [KINDS[c.kind] || c.kind];
    if (c.kind === 'red_packet' && c.total_fen !== undefined) facts.push('¥' + yuan(c.total_fen) + ' / ' + count(c.count));
    if (c.starts_at || c.ends_at) facts.push(when(c.starts_at) + ' → ' + when(c.ends_at));
    if (c.created_at) facts.push('创建 Created ' + when(c.created_at));
    a.appendChild(el('span', { class: 'campaign__facts' }, facts.join(' · ')));
    li.appendChild(a);
    return li;
  }

  async function loadList(reset) {
    if (list.loading) return;
    list.loading = true;
    var params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if ($('filter-state').value) params.set('state', $('filter-state').value);
    if ($('filter-kind').value) params.set('kind', $('filter-kind').value);
    if (!reset && list.next) params.set('cursor', list.next);
    var res = await api('GET', '/api/admin/campaigns?' + params);
    list.loading = false;
    $('list-error').textContent = res.status === 200 ? '' : problem(res);
    if (res.status !== 200) return;
    var ul = $('campaigns');
    if (reset) ul.replaceChildren();
    res.data.campaigns.forEach(function (c) { ul.appendChild(listItem(c)); });
    list.next = res.data.next;
    $('more').hidden = !list.next;
    $('list-empty').hidden = ul.children.length > 0;
  }

  function openList() {
    show('list');
    list.next = null;
    loadList(true);
  }

  // ---- the audit log ------------------------------------------------------------------------

  function auditItem(e) {
    var li = el('li', { class: 'campaign audit-entry' });
    var box = el('div', { class: 'campaign__link' });
    var head = el('span', { class: 'campaign__head' });
    head.appendChild(el('span', { class: 'campaign__name' }, e.operator + ' (' + e.role + ') ' + e.method + ' ' + e.path));
    head.appendChild(el('span', { class: 'badge ' + (e.status < 300 ? 'badge--open' : 'badge--sold_out'), 'data-status': String(e.status) }, String(e.status)));
    box.appendChild(head);
    box.appendChild(el('span', { class: 'campaign__facts' }, [when(e.at), e.remote || '—', e.request_id || ''].join(' · ')));
    li.appendChild(box);
    return li;
  }

  async function loadAudit(reset) {
    if (audit.loading) return;
    audit.loading = true;
    var params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (!reset && audit.next) params.set('cursor', audit.next);
    var res = await api('GET', '/api/admin/audit?' + params);
    audit.loading = false;
    $('audit-error').textContent = res.status === 200 ? '' : problem(res);
    if (res.status !== 200) return;
    var ul = $('audit');
    if (reset) ul.replaceChildren();
    res.data.entries.forEach(function (e) { ul.appendChild(auditItem(e)); });
    audit.next = res.data.next;
    $('audit-more').hidden = !audit.next;
    $('audit-empty').hidden = ul.children.length > 0;
  }

  function openAudit() {
    show('audit');
    audit.next = null;
    loadAudit(true);
  }

  // ---- creating a campaign ------------------------------------------------------------------

  function kind() { return document.querySelector('input[name=kind]:checked').value; }

  function addTier(values) {
    var node = $('tier-template').content.firstElementChild.cloneNode(true);
    Object.keys(values || {}).forEach(function (k) { node.querySelector('[data-key=' + k + ']').value = values[k]; });
    node.querySelector('.tier__remove').addEventListener('click', function () {
      node.remove();
      numberTiers();
    });
    $('tiers').appendChild(node);
    numberTiers();
  }

  // Each tier's boxes carry their path in the definition (tiers[1].stock), as 422s name it.
  function numberTiers() {
    var rows = $('tiers').children;
    Array.prototype.forEach.call(rows, function (row, i) {
      row.setAttribute('data-field', 'tiers[' + i + ']');
      row.querySelectorAll('.field').forEach(function (f) {
        f.setAttribute('data-field', 'tiers[' + i + '].' + f.querySelector('input').getAttribute('data-key'));
      });
      row.querySelector('.tier__remove').hidden = rows.length === 1;
    });
  }

  function showKind() {
    var k = kind();
    ['red_packet', 'lottery'].forEach(function (name) { $('fields-' + name).hidden = name !== k; });
  }

  function openCreate() {
    show('create');
    clearErrors();
    if (!$('tiers').children.length) addTier();
    showKind();
    $('f-name').focus();
  }

  function number(input) {
    var v = input.value.trim();
    return v === '' ? null : Number(v);
  }

  // datetime-local is the operator's local time; the API takes RFC 3339 with an offset.
  function moment(input) {
    var v = input.value;
    if (!v) return null;
    var d = new Date(v);
    return isNaN(d) ? v : d.toISOString();
  }

  // Empty optional boxes are left out, so the API's own defaults apply.
  function put(body, key, value) { if (value !== null && value !== '') body[key] = value; }

  function definition() {
    var body = { kind: kind(), name: $('f-name').value };
    if (body.kind === 'red_packet') {
      ['total_fen', 'count', 'min_fen', 'max_fen', 'shards'].forEach(function (k) { put(body, k, number($('f-' + k))); });
      body.split = $('f-split').value;
    } else {
      body.tiers = Array.prototype.map.call($('tiers').children, function (row) {
        var tier = {};
        put(tier, 'name', row.querySelector('[data-key=name]').value);
        put(tier, 'stock', number(row.querySelector('[data-key=stock]')));
        put(tier, 'weight', number(row.querySelector('[data-key=weight]')));
        tier.value_fen = number(row.querySelector('[data-key=value_fen]'));
        return tier;
      });
      put(body, 'no_prize_weight', number($('f-no_prize_weight')));
      put(body, 'fallback', $('f-fallback').value.trim());
      // An empty quota box means no cap: sent as null (absent would mean the default).
      body.quota_total = number($('f-quota_total'));
      put(body, 'quota_daily', number($('f-quota_daily')));
      body.when_out = $('f-when_out').value;
    }
    put(body, 'starts_at', moment($('f-starts_at')));
    put(body, 'ends_at', moment($('f-ends_at')));
    return body;
  }

  function clearErrors() {
    var form = $('create-form');
    form.querySelectorAll('.field__error, .form__error').forEach(function (e) { e.textContent = ''; });
    form.querySelectorAll('[data-invalid]').forEach(function (e) { e.removeAttribute('data-invalid'); });
    form.querySelectorAll('[aria-invalid]').forEach(function (e) { e.removeAttribute('aria-invalid'); });
  }

  // The box a 422's field names, or the nearest enclosing one (tiers[0].schedule[1].at is
  // shown on tier 0); a field the form has no box for is shown above the buttons.
  function fieldBox(field) {
    var form = $('create-form');
    var path = field || '';
    while (path) {
      var box = form.querySelector('[data-field="' + CSS.escape(path) + '"]');
      if (box && !box.closest('[hidden]')) return box;
      var shorter = path.replace(/(\.[^.[\]]+|\[\d+\])$/, '');
      if (shorter === path) break;
      path = shorter;
    }
    return null;
  }

  function showFieldError(field, message) {
    var box = fieldBox(field);
    if (box === null) {
      $('form-error').textContent = message;
      return;
    }
    box.setAttribute('data-invalid', '');
    var slot = Array.prototype.find.call(box.children, function (c) { return c.classList.contains('field__error'); });
    slot.textContent = message;
    var input = box.querySelector('input, select');
    if (input && box.classList.contains('field')) {
      input.setAttribute('aria-invalid', 'true');
      input.focus();
    }
    box.scrollIntoView({ block: 'center' });
  }

  async function create(event) {
    event.preventDefault();
    clearErrors();
    var button = $('create');
    button.disabled = true;
    var res = await api('POST', '/api/admin/campaigns', definition());
    button.disabled = false;
    if (res.status === 201) {
      $('create-form').reset();
      $('tiers').replaceChildren();
      document.querySelectorAll('.field__hint[id^=yuan-]').forEach(function (h) { h.textContent = ''; });
      toast('已创建 Created: ' + res.data.name);
      location.hash = '#/c/' + encodeURIComponent(res.data.id);
    } else if (res.status === 422) {
      showFieldError(res.data.field, res.data.message);
    } else if (res.status !== 401) {
      $('form-error').textContent = problem(res);
    }
  }

  function showYuan(event) {
    var target = event.target.getAttribute('data-yuan');
    if (!target) return;
    var v = number(event.target);
    $(target).textContent = v !== null && Number.isInteger(v) ? '= ¥' + yuan(v) + ' 元 yuan' : '';
  }

  // ---- charts: small hand-drawn SVG ---------------------------------------------------------

  var W = 320;
  var H = 100;
  var PAD = 4;

  // A line over the last HISTORY samples, scaled from 0 to the largest value shown.
  function lineChart(figure, values, format) {
    var max = Math.max.apply(null, values.concat([1]));
    var root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, class: 'chart__svg', role: 'img' });
    root.appendChild(svg('line', { x1: 0, y1: H - PAD, x2: W, y2: H - PAD, class: 'chart__axis' }));
    var step = (W - 2 * PAD) / (HISTORY - 1);
    var offset = HISTORY - values.length;
    var points = values.map(function (v, i) {
      return (PAD + (offset + i) * step).toFixed(1) + ',' + (H - PAD - (v / max) * (H - 2 * PAD - 14)).toFixed(1);
    });
    if (points.length > 1) root.appendChild(svg('polyline', { points: points.join(' '), class: 'chart__line' }));
    if (points.length) {
      var end = points[points.length - 1].split(',');
      root.appendChild(svg('circle', { cx: end[0], cy: end[1], r: 3, class: 'chart__dot' }));
    }
    root.appendChild(svg('text', { x: W - PAD, y: 12, class: 'chart__max', 'text-anchor': 'end' }, 'max ' + format(max)));
    var last = values.length ? values[values.length - 1] : 0;
    root.setAttribute('aria-label', format(last));
    replaceChart(figure, root, format(last));
  }

  function replaceChart(figure, root, now) {
    var old = figure.querySelector('.chart__svg');
    if (old) old.remove();
    var value = figure.querySelector('.chart__now') || figure.insertBefore(el('p', { class: 'chart__now' }), figure.firstChild);
    value.textContent = now;
    figure.appendChild(root);
  }

  // Horizontal bars of parts of a whole: each row is [label, [[value, class], ...], total].
  // Widths are percentages, so labels keep their size however wide the card is.
  function barChart(figure, rows) {
    var rowH = 36;
    var root = svg('svg', { height: Math.max(rowH, rows.length * rowH), class: 'chart__svg chart__bars', role: 'img' });
    rows.forEach(function (row, i) {
      var y = i * rowH;
      root.appendChild(svg('text', { x: 0, y: y + 13, class: 'chart__label' }, row[0]));
      root.appendChild(svg('rect', { x: 0, y: y + 18, width: '100%', height: 12, rx: 3, class: 'bar__track' }));
      var x = 0;
      row[1].forEach(function (part) {
        var w = row[2] > 0 ? (part[0] / row[2]) * 100 : 0;
        if (w > 0) root.appendChild(svg('rect', { x: x.toFixed(2) + '%', y: y + 18, width: w.toFixed(2) + '%', height: 12, class: part[1] }));
        x += w;
      });
    });
    root.setAttribute('aria-label', rows.map(function (r) { return r[0]; }).join('; '));
    replaceChart(figure, root, '');
  }

  // ---- the live view ------------------------------------------------------------------------

  function stopLive() {
    clearTimeout(live.timer);
    live.id = null;
    live.gen += 1;
  }

  function openLive(id) {
    show('live');
    stopLive();
    live.id = id;
    live.samples = [];
    live.stats = null;
    $('live-name').textContent = '…';
    $('kpis').replaceChildren();
    $('live-error').textContent = '';
    tick(id, live.gen);
  }

  async function tick(id, gen) {
    var res = await api('GET', '/api/admin/campaigns/' + encodeURIComponent(id));
    if (live.gen !== gen) return;
    if (res.status === 200) {
      sample(res.data);
      $('live-error').textContent = '';
      $('live-dot').removeAttribute('data-stale');
    } else {
      $('live-error').textContent = problem(res);
      $('live-dot').setAttribute('data-stale', '');
      if (res.status === 404 || res.status === 401) return;
    }
    live.timer = setTimeout(function () { tick(id, gen); }, POLL_MS);
  }

  // What moves: envelopes won (red packet) or draws made (lottery), per second between polls.
  function settled(s) { return s.kind === 'lottery' ? s.draws : s.won_count; }

  function sample(stats) {
    var now = performance.now();
    var prev = live.samples[live.samples.length - 1];
    var rate = prev ? Math.max(0, settled(stats) - prev.settled) / Math.max(0.001, (now - prev.t) / 1000) : 0;
    live.samples.push({ t: now, settled: settled(stats), rate: rate, stats: stats });
    if (live.samples.length > HISTORY) live.samples.shift();
    live.stats = stats;
    render(stats);
  }

  function kpi(dl, key, label, value) {
    var box = el('div', { class: 'kpi', 'data-kpi': key });
    box.appendChild(el('dt', {}, label));
    box.appendChild(el('dd', { id: 'kpi-' + key }, value));
    dl.appendChild(box);
  }

  function render(s) {
    $('live-name').textContent = s.name;
    var state = $('live-state');
    state.textContent = STATES[s.state] || s.state;
    state.className = 'badge badge--' + s.state;
    state.setAttribute('data-state', s.state);
    $('live-kind').textContent = KINDS[s.kind] || s.kind;
    $('live-id').textContent = s.id;
    $('live-page').setAttribute('href', '/c/' + encodeURIComponent(s.id));
    $('live-window').textContent = '开始 Starts ' + (s.starts_at ? when(s.starts_at) : '立即 at once') +
      ' · 结束 Ends ' + (s.ends_at ? when(s.ends_at) : '不设 none');
    $('act-pause').disabled = s.state === 'paused' || s.state === 'ended';
    $('act-resume').disabled = s.state !== 'paused';
    $('act-end').disabled = s.state === 'ended';

    var dl = el('dl', { class: 'kpis', id: 'kpis' });
    var rates = live.samples.map(function (x) { return x.rate; });
    var lottery = s.kind === 'lottery';
    if (lottery) {
      kpi(dl, 'draws', '抽奖次数 Draws', count(s.draws));
      kpi(dl, 'prizes_won', '中奖 Prizes won', count(s.prizes_won));
      var left = s.tiers.reduce(function (n, t) { return n + t.left; }, 0);
      kpi(dl, 'left', '可抽库存 Stock left (released)', count(left));
      if (s.closeout) {
        var sum = function (key) { return s.closeout.reduce(function (n, t) { return n + t[key]; }, 0); };
        kpi(dl, 'unwon', '结算：未抽中 Closed out: unwon', count(sum('unwon')));
        kpi(dl, 'unreleased', '结算：未释放 Closed out: unreleased', count(sum('unreleased')));
      }
    } else {
      kpi(dl, 'won_count', '已抢 Envelopes won', count(s.won_count) + ' / ' + count(s.count));
      kpi(dl, 'won_fen', '已抢金额 Won (yuan)', '¥' + yuan(s.won_fen));
      kpi(dl, 'remaining_count', '剩余个数 Envelopes left', count(s.remaining_count));
      kpi(dl, 'remaining_fen', '剩余金额 Left (yuan)', '¥' + yuan(s.remaining_fen));
      // Refunds exist only once a red packet is closed out (ended with envelopes left).
      if (s.refunded_count !== undefined && (s.state === 'ended' || s.refunded_count > 0)) {
        kpi(dl, 'refunded_count', '退回个数 Envelopes refunded', count(s.refunded_count));
        kpi(dl, 'refunded_fen', '退回金额 Refunded (yuan)', '¥' + yuan(s.refunded_fen));
      }
    }
    kpi(dl, 'ledger_lag', '账本延迟 Ledger lag', count(s.ledger_lag));
    $('kpis').replaceWith(dl);

    var rateFigure = $('chart-rate');
    rateFigure.querySelector('figcaption').textContent = lottery ? '每秒抽奖 Draws per second' : '每秒抢红包 Grabs per second';
    lineChart(rateFigure, rates, function (v) { return v.toFixed(1) + ' /s'; });
    var remaining = $('chart-remaining');
    var remainingFen = $('chart-remaining-fen');
    remainingFen.hidden = lottery;
    if (lottery) {
      remaining.querySelector('figcaption').textContent = '可抽库存 Stock left (released, all tiers)';
      lineChart(remaining, live.samples.map(function (x) {
        return x.stats.tiers.reduce(function (n, t) { return n + t.left; }, 0);
      }), count);
    } else {
      remaining.querySelector('figcaption').textContent = '剩余个数 Envelopes left';
      lineChart(remaining, live.samples.map(function (x) { return x.stats.remaining_count; }), count);
      remainingFen.querySelector('figcaption').textContent = '剩余金额 Left (yuan)';
      lineChart(remainingFen, live.samples.map(function (x) { return x.stats.remaining_fen; }), function (v) { return '¥' + yuan(v); });
    }
    lineChart($('chart-lag'), live.samples.map(function (x) { return x.stats.ledger_lag; }), count);

    var tiers = $('chart-tiers');
    tiers.hidden = !lottery;
    if (lottery) {
      barChart(tiers, s.tiers.map(function (t) {
        return [
          t.name + '  ' + count(t.won) + ' / ' + count(t.released) + ' / ' + count(t.stock),
          [[t.won, 'bar--won'], [t.released - t.won, 'bar--left']],
          t.stock
        ];
      }));
    }
    // A sharded red packet: how far each sub-pool has sold (a dry home sends its
    // players on to the others).
    var shards = $('chart-shards');
    shards.hidden = lottery || !(s.shards > 1);
    if (!shards.hidden) {
      barChart(shards, s.per_shard.map(function (p) {
        var size = p.won_count + p.remaining_count + p.refunded_count;
        return [
          '分片 Shard ' + p.shard + '  ' + count(p.won_count) + ' / ' + count(size),
          [[p.won_count, 'bar--won'], [p.remaining_count, 'bar--left']],
          size
        ];
      }));
    }
    var payouts = $('chart-payouts');
    payouts.hidden = !s.payouts;
    if (s.payouts) {
      var total = s.payouts.total || { count: 0, fen: 0 };
      barChart(payouts, Object.keys(s.payouts).filter(function (k) { return k !== 'total'; }).map(function (k) {
        var p = s.payouts[k];
        var label = (PAYOUT_STATES[k] ? PAYOUT_STATES[k] + ' ' : '') + k;
        return [label + '  ' + count(p.count) + ' · ¥' + yuan(p.fen), [[p.count, 'bar--state bar--' + k.toLowerCase()]], total.count];
      }));
    }
  }

  function confirmAction(name) {
    var dialog = $('confirm');
    var what = ACTIONS[name];
    $('confirm-text').textContent = what.text + '：「' + live.stats.name + '」？ ' + what.note;
    $('confirm-ok').className = 'btn ' + (name === 'end' ? 'btn--danger' : 'btn--primary');
    return new Promise(function (resolve) {
      dialog.addEventListener('close', function () { resolve(dialog.returnValue === 'ok'); }, { once: true });
      dialog.returnValue = '';
      dialog.showModal();
    });
  }

  async function act(name) {
    if (!live.stats || live.busy) return;
    var id = live.stats.id;
    if (!(await confirmAction(name))) return;
    live.busy = true;
    var res = await api('POST', '/api/admin/campaigns/' + encodeURIComponent(id) + '/' + name);
    live.busy = false;
    if (res.status === 200) {
      toast(ACTIONS[name].text + ' ✓');
      if (live.id === id) sample(res.data);
    } else if (res.status !== 401) {
      $('live-error').textContent = problem(res);
    }
  }

  // The CSV needs the token, so it is fetched here and handed to the browser as a Blob.
  async function downloadCsv() {
    if (!live.stats) return;
    var id = live.stats.id;
    var resp = await request('GET', '/api/admin/campaigns/' + encodeURIComponent(id) + '/winners.csv');
    if (resp === null || !resp.ok) {
      var res = { status: resp ? resp.status : 0, data: {} };
      try { res.data = await resp.json(); } catch (e) { res.data = {}; }
      if (res.status === 401) return signOut('令牌无效或已失效，请重新登录 The token was refused; sign in again');
      $('live-error').textContent = problem(res);
      return;
    }
    var url = URL.createObjectURL(await resp.blob());
    var a = el('a', { href: url, download: 'winners-' + id + '.csv', hidden: '' });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }

  // ---- wiring -------------------------------------------------------------------------------

  $('signin-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', function () { signOut(''); });
  $('filter-state').addEventListener('change', function () { loadList(true); });
  $('filter-kind').addEventListener('change', function () { loadList(true); });
  $('more').addEventListener('click', function () { loadList(false); });
  $('audit-more').addEventListener('click', function () { loadAudit(false); });
  $('create-form').addEventListener('submit', create);
  $('create-form').addEventListener('input', showYuan);
  $('create-form').addEventListener('change', function (event) {
    if (event.target.name === 'kind') {
      clearErrors();
      showKind();
    }
  });
  $('add-tier').addEventListener('click', function () { addTier(); });
  ['pause', 'resume', 'end'].forEach(function (name) {
    $('act-' + name).addEventListener('click', function () { act(name); });
  });
  $('act-csv').addEventListener('click', downloadCsv);
  window.addEventListener('hashchange', route);
  route();
})();
