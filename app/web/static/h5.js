// The player page: one campaign, rendered by its kind (red_packet or lottery).
// Money arrives as integer fen and is formatted with integer arithmetic only.
(function () {
  'use strict';

  var $ = function (id) { return document.getElementById(id); };
  var HEADERS = { 'X-Requested-With': 'hongbao', Accept: 'application/json' };
  var ui = {
    stage: $('stage'), name: $('name'), status: $('status'), countdown: $('countdown'),
    action: $('action'), label: $('action-label'), result: $('result'),
    resultTitle: $('result-title'), resultAmount: $('result-amount'), amount: $('amount'),
    resultNote: $('result-note'), foot: $('foot'), toast: $('toast'), account: $('account')
  };
  var page = { id: null, campaign: null, mode: null, me: null, loggedIn: false, offsetMs: 0, timer: 0, busy: false };

  function yuan(fen) {
    var f = Math.max(0, Math.trunc(Number(fen) || 0));
    var whole = String((f - f % 100) / 100).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
    return whole + '.' + String(f % 100).padStart(2, '0');
  }

  // One idempotency key per draw: made on a tap, kept while the answer is unknown (a lost
  // reply, a 5xx), so the retry tap cannot draw a second time.
  function newDrawKey() {
    var bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, function (b) { return b.toString(16).padStart(2, '0'); }).join('');
  }

  async function api(method, path, extra) {
    var resp;
    try {
      var headers = extra ? Object.assign({}, HEADERS, extra) : HEADERS;
      resp = await fetch(path, { method: method, headers: headers, credentials: 'same-origin', cache: 'no-store' });
    } catch (e) {
      return { status: 0, data: { error: 'network' }, headers: new Headers() };
    }
    var data = {};
    try { data = await resp.json(); } catch (e) { data = {}; }
    return { status: resp.status, data: data, headers: resp.headers };
  }

  function errorText(res) {
    var code = res.data && res.data.error;
    if (res.status === 0) return '网络不给力，请检查网络后重试';
    if (res.status === 429) {
      if (code === 'quota_exhausted') return QUOTA_TEXT[res.data.scope] || QUOTA_TEXT.daily;
      var wait = parseInt(res.headers.get('Retry-After') || '', 10);
      return '参与的人太多了，请' + (wait > 0 ? ' ' + wait + ' 秒后' : '稍后') + '再试';
    }
    if (res.data && res.data.reason === 'snapshot_user') return '当前是预览模式，请点击屏幕右下角“使用完整服务”后参与';
    if (code === 'csrf') return '请求来源异常，请刷新页面后重试';
    if (code === 'not_started') return '活动还没开始，请稍候';
    if (code === 'ended') return '活动已结束';
    if (code === 'paused') return '活动暂停中，请稍后再试';
    if (code === 'not_found') return '活动不存在或已下线';
    if (res.status >= 500) return '服务繁忙，请稍后再试';
    return (res.data && res.data.message) || '出错了，请稍后再试';
  }

  var QUOTA_TEXT = { total: '你的抽奖次数已用完，感谢参与', daily: '今天的次数已用完，明天再来吧' };

  // A lottery player's draws left, from /me's counts (kept current after each draw).
  function drawsLeft(me) {
    var total = me.quota_total === null ? Infinity : me.quota_total - me.draws;
    var today = me.quota_daily === null ? Infinity : me.quota_daily - me.draws_today;
    if (total <= 0) return { n: 0, note: QUOTA_TEXT.total };
    if (today <= 0) return { n: 0, note: QUOTA_TEXT.daily };
    var n = Math.min(total, today);
    return { n: n, note: '还可以抽 ' + n + ' 次' + (today < total ? '（今天）' : '') };
  }

  // Lottery outcomes end in the opened card once no draw is left; until then the button
  // stays, and the status line above says how many draws are left.
  function drawOutcome(outcome) {
    var left = drawsLeft(page.me);
    outcome.again = left.n > 0;
    outcome.note = outcome.again ? '' : left.note;
    return outcome;
  }

  // Each campaign kind says how its button reads and what its answers mean.
  var MODES = {
    red_packet: {
      action: 'grab', button: '開', loginButton: '微信登录 抢红包', brand: '恭喜发财，大吉大利',
      // 拼手气 (random split) or 普通 (fixed: every envelope the same amount).
      rules: function (c) {
        return (c.split === 'fixed' ? '普通红包' : '拼手气红包') + ' · 每人限抢一次 · 先到先得';
      },
      fromMe: function (me) {
        return me.result === 'won' ? { title: '你已抢到红包', fen: me.amount_fen } : null;
      },
      fromAction: function (data) {
        if (data.result === 'won') return { title: '恭喜发财', fen: data.amount_fen };
        if (data.result === 'already_won') return { title: '你已抢到红包', fen: data.amount_fen };
        if (data.result === 'sold_out') return { title: '手慢了，红包派完了', note: '下次早点来' };
        return null;
      },
      soldOut: { title: '手慢了，红包派完了', note: '下次早点来' },
      status: function (c) { return '剩余 ' + c.remaining_count + ' 个'; }
    },
    lottery: {
      action: 'draw', button: '抽', label: '抽奖', loginButton: '微信登录 去抽奖', brand: '好运连连，抽奖赢好礼',
      rules: function () { return '次数有限 · 奖品先到先得'; },
      fromMe: function (me) {
        var prizes = me.prizes || [];
        var last = prizes[prizes.length - 1];
        if (drawsLeft(me).n > 0) return null;
        if (!last) return drawOutcome({ title: '没有抽中奖品' });
        return drawOutcome({ title: '你已抽中 ' + last.name, fen: last.value_fen });
      },
      fromAction: function (data) {
        if (data.result !== 'prize' && data.result !== 'no_prize') return null;
        page.me.draws += 1;
        page.me.draws_today += 1;
        if (data.result === 'no_prize') return drawOutcome({ title: data.name || '谢谢参与' });
        var prize = data.prize || {};
        return drawOutcome({ title: '恭喜抽中 ' + (prize.name || '奖品'), fen: prize.value_fen });
      },
      soldOut: { title: '奖品已抽完', note: '感谢参与' },
      status: function () { return page.me ? drawsLeft(page.me).note : '进行中'; }
    }
  };

  // The money's way to the player's 零钱 (WeChat Pay merchant transfer): 待领取 until the
  // player confirms, 到账中, then 已到账 only once WeChat Pay said SUCCESS, or 未到账 and why.
  var pay = { box: $('payout'), state: $('payout-state'), claim: $('claim'), polls: 0, timer: 0 };
  var POLL_MS = 2000;
  var POLL_MAX = 150;

  function renderPayout(p) {
    if (ui.stage.getAttribute('data-state') !== 'won') {
      pay.box.hidden = true;
      return;
    }
    // No payout yet: the grant is still on its way to the ledger, its bill not made.
    var state = p ? p.state : 'to_claim';
    var text = p ? p.label : '待领取';
    var reasons = p ? p.bills.map(function (b) { return b.reason; }).filter(Boolean) : [];
    if (state === 'failed' && reasons.length) text += '：' + reasons[0];
    if (state === 'to_claim' && p && p.queue_position) text += '（转账排队中，前面还有 ' + p.queue_position + ' 笔）';
    pay.box.hidden = false;
    pay.box.setAttribute('data-payout', state);
    pay.state.textContent = text;
    pay.claim.hidden = state !== 'to_claim';
    clearTimeout(pay.timer);
    if ((state === 'to_claim' || state === 'in_transit') && pay.polls < POLL_MAX) {
      pay.timer = setTimeout(refreshPayout, POLL_MS);
    }
  }

  async function refreshPayout() {
    pay.polls += 1;
    var me = await api('GET', '/api/campaigns/' + encodeURIComponent(page.id) + '/me');
    if (me.status === 200) renderPayout(me.data.payout);
  }

  async function claim() {
    pay.claim.disabled = true;
    var res = await api('POST', '/api/campaigns/' + encodeURIComponent(page.id) + '/claim');
    pay.claim.disabled = false;
    var d = res.data || {};
    if (res.status === 200 && d.result === 'confirm') {
      if (window.WeixinJSBridge) {
        // In WeChat: its own confirmation sheet; the result comes back by notification.
        window.WeixinJSBridge.invoke('requestMerchantTransfer',
          { mchId: d.mch_id, appId: d.appid, package: d.package_info },
          function () { pay.polls = 0; refreshPayout(); });
      } else if (d.confirm_url) {
        // A local run: the fake WeChat Pay's confirm page, which comes back here.
        location.assign(d.confirm_url + '?package=' + encodeURIComponent(d.package_info) +
          '&return=' + encodeURIComponent(location.href));
      } else {
        toast('请在微信中打开本页领取');
      }
      return;
    }
    if (res.status === 200) {
      renderPayout(d.payout);
      return;
    }
    if (res.status === 409 && d.error === 'payout_not_ready') {
      toast('转账准备中' + (d.queue_position ? '，前面还有 ' + d.queue_position + ' 笔' : '') + '，请稍后再点');
      pay.polls = 0;
      refreshPayout();
      return;
    }
    toast(errorText(res));
  }

  // The results everyone may see (GET .../results): a finished red packet's 手气最佳 and
  // everyone's luck, a lottery's prize list and latest winners. A red packet that has just
  // sold out may need a moment for its ledger to catch up (409 not_finished): ask again.
  var board = {
    luck: $('luck'), best: $('luck-best'), bestName: $('best-name'), bestAmount: $('best-amount'),
    summary: $('luck-summary'), list: $('luck-list'), prizes: $('prizes'), prizeList: $('prize-list'),
    winnersTitle: $('prize-winners-title'), winners: $('prize-winners'), tries: 0, timer: 0
  };
  var RESULTS_RETRY_MS = 2000;
  var RESULTS_TRIES = 30;

  function clock(iso) {
    var d = new Date(iso);
    return isNaN(d) ? '' : pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  function boardRow(name, note, value, badge) {
    var li = document.createElement('li');
    li.className = 'board__row';
    var who = document.createElement('span');
    who.className = 'board__who';
    var nameEl = document.createElement('span');
    nameEl.className = 'board__name';
    nameEl.textContent = name;
    var noteEl = document.createElement('span');
    noteEl.className = 'board__note';
    noteEl.textContent = note;
    who.append(nameEl, noteEl);
    var what = document.createElement('span');
    what.className = 'board__value';
    what.textContent = value;
    if (badge) {
      var mark = document.createElement('span');
      mark.className = 'board__badge';
      mark.textContent = badge;
      what.append(mark);
    }
    li.append(who, what);
    return li;
  }

  function emptyRow(text) {
    var li = document.createElement('li');
    li.className = 'board__empty';
    li.textContent = text;
    return li;
  }

  async function showResults() {
    clearTimeout(board.timer);
    var res = await api('GET', '/api/campaigns/' + encodeURIComponent(page.id) + '/results');
    if (res.status === 409 && board.tries < RESULTS_TRIES) {
      board.tries += 1;
      board.timer = setTimeout(showResults, RESULTS_RETRY_MS);
      return;
    }
    if (res.status !== 200) return;
    if (res.data.kind === 'lottery') showPrizes(res.data);
    else showLuck(res.data);
  }

  function showLuck(r) {
    var best = r.best;
    board.best.hidden = !best;
    if (best) {
      board.bestName.textContent = best.name;
      board.bestAmount.textContent = yuan(best.amount_fen);
    }
    board.summary.textContent = '已领取 ' + r.won_count + '/' + r.count + ' 个，共 ' +
      yuan(r.won_fen) + '/' + yuan(r.total_fen) + ' 元';
    var rows = r.winners.map(function (w) {
      var isBest = best && w.name === best.name && w.amount_fen === best.amount_fen && w.granted_at === best.granted_at;
      return boardRow(w.name, clock(w.granted_at), yuan(w.amount_fen) + ' 元', isBest ? '手气最佳' : '');
    });
    board.list.replaceChildren.apply(board.list, rows.length ? rows : [emptyRow('这个红包没有人领取')]);
    board.luck.hidden = false;
  }

  function showPrizes(r) {
    board.prizeList.replaceChildren.apply(board.prizeList, r.prizes.map(function (p) {
      var value = p.value_fen === null ? '奖品' : yuan(p.value_fen) + ' 元';
      return boardRow(p.name, value, '已抽中 ' + p.won + '/' + p.stock, '');
    }));
    board.winnersTitle.hidden = !r.winners.length;
    board.winners.replaceChildren.apply(board.winners, r.winners.map(function (w) {
      return boardRow(w.name, clock(w.drawn_at), w.prize, '');
    }));
    board.prizes.hidden = false;
  }

  function toast(text) {
    ui.toast.textContent = text;
    ui.toast.hidden = !text;
  }

  function setStatus(text) { ui.status.textContent = text; }

  function setButton(label, enabled, wide) {
    ui.label.textContent = label;
    ui.action.disabled = !enabled;
    ui.action.classList.toggle('is-wide', !!wide);
    ui.action.hidden = false;
  }

  function showOutcome(outcome) {
    ui.result.hidden = false;
    ui.resultTitle.textContent = outcome.title;
    var hasAmount = outcome.fen !== undefined && outcome.fen !== null;
    ui.resultAmount.hidden = !hasAmount;
    ui.amount.textContent = hasAmount ? yuan(outcome.fen) : '';
    ui.amount.classList.toggle('is-long', ui.amount.textContent.length > 9);
    ui.resultNote.textContent = outcome.note || '';
    if (outcome.again) {
      setButton(page.mode.button, true, false);
      setStatus(page.mode.status(page.campaign));
      ui.stage.setAttribute('data-again', '');
    } else {
      ui.stage.removeAttribute('data-again');
      ui.stage.setAttribute('data-opened', '');
    }
    ui.stage.setAttribute('data-state', outcome.fen ? 'won' : 'done');
  }

  function pad(n) { return String(n).padStart(2, '0'); }

  function tick() {
    var left = Date.parse(page.campaign.starts_at) - (Date.now() + page.offsetMs);
    if (left <= 0) {
      clearInterval(page.timer);
      ui.countdown.hidden = true;
      load();
      return;
    }
    var s = Math.ceil(left / 1000);
    var d = Math.floor(s / 86400);
    var clock = pad(Math.floor(s % 86400 / 3600)) + ':' + pad(Math.floor(s % 3600 / 60)) + ':' + pad(s % 60);
    ui.countdown.textContent = (d > 0 ? d + ' 天 ' : '') + clock;
    ui.countdown.hidden = false;
  }

  function loginUrl() {
    return '/auth/wechat/login?next=' + encodeURIComponent(location.pathname);
  }

  function renderAccount() {
    ui.account.textContent = '';
    if (!page.loggedIn) return;
    ui.account.append('已登录');
    var out = document.createElement('button');
    out.type = 'button';
    out.textContent = '退出登录';
    out.addEventListener('click', async function () {
      await api('POST', '/auth/logout');
      location.reload();
    });
    ui.account.append(out);
  }

  function render(me) {
    var c = page.campaign;
    var mode = page.mode;
    ui.name.textContent = c.name;
    document.title = c.name;
    ui.stage.querySelector('.packet__brand').textContent = mode.brand;
    ui.action.setAttribute('aria-label', mode.label || '开红包');
    ui.foot.textContent = mode.rules(c);
    ui.stage.setAttribute('data-state', c.state);
    renderAccount();
    if (c.kind === 'lottery' || c.state === 'sold_out' || c.state === 'ended') showResults();
    var already = me ? mode.fromMe(me) : null;
    if (already) {
      setStatus('');
      showOutcome(already);
      return;
    }
    if (c.state === 'scheduled') {
      setStatus('距开始还有');
      setButton(mode.button, false, false);
      tick();
      page.timer = setInterval(tick, 1000);
    } else if (c.state === 'open') {
      setStatus(mode.status(c));
      if (page.loggedIn) setButton(mode.button, true, false);
      else setButton(mode.loginButton, true, true);
    } else if (c.state === 'sold_out') {
      setStatus('');
      ui.action.hidden = true;
      showOutcome(mode.soldOut);
    } else if (c.state === 'paused') {
      setStatus('活动暂停中，请稍后再来');
      setButton(mode.button, false, false);
    } else {
      setStatus('活动已结束');
      ui.action.hidden = true;
    }
  }

  async function act() {
    if (page.busy) return;
    if (!page.loggedIn) {
      location.assign(loginUrl());
      return;
    }
    page.busy = true;
    toast('');
    ui.action.disabled = true;
    ui.action.classList.add('is-spinning');
    var started = Date.now();
    var extra = null;
    if (page.mode.action === 'draw') {
      page.drawKey = page.drawKey || newDrawKey();
      extra = { 'Idempotency-Key': page.drawKey };
    }
    var res = await api('POST', '/api/campaigns/' + encodeURIComponent(page.id) + '/' + page.mode.action, extra);
    // Only an unknown outcome (no reply, a 5xx) keeps the key: the retry may find the draw made.
    if (res.status !== 0 && res.status < 500) page.drawKey = null;
    // Let the coin turn at least once: the moment is part of the product.
    var rest = 700 - (Date.now() - started);
    if (rest > 0) await new Promise(function (r) { setTimeout(r, rest); });
    ui.action.classList.remove('is-spinning');
    page.busy = false;
    if (res.status === 401) {
      page.loggedIn = false;
      toast('登录已过期，请重新登录');
      setButton(page.mode.loginButton, true, true);
      return;
    }
    var outcome = res.status === 200 ? page.mode.fromAction(res.data) : null;
    if (outcome) {
      showOutcome(outcome);
      if (outcome.fen) refreshPayout();
      // Sold out: everyone's luck is final (a lottery's prize list changed with this draw).
      if (res.data.result === 'sold_out' || page.mode.action === 'draw') showResults();
      return;
    }
    toast(errorText(res));
    var code = res.data && res.data.error;
    var retry = (res.status === 429 && code !== 'quota_exhausted') || res.status === 0 || res.status >= 500;
    ui.action.disabled = !retry;
    if (code === 'ended' || code === 'not_found') ui.action.hidden = true;
  }

  async function load() {
    var res = await api('GET', '/api/campaigns/' + encodeURIComponent(page.id));
    if (res.status !== 200) {
      ui.name.textContent = res.status === 404 ? '活动不存在' : '暂时无法加载';
      setStatus(res.status === 404 ? '请检查链接是否正确' : '');
      ui.action.hidden = true;
      if (res.status !== 404) toast(errorText(res));
      return;
    }
    var date = Date.parse(res.headers.get('Date') || '');
    if (!isNaN(date)) page.offsetMs = date - Date.now();
    page.campaign = res.data;
    page.mode = MODES[res.data.kind] || MODES.red_packet;
    var me = await api('GET', '/api/campaigns/' + encodeURIComponent(page.id) + '/me');
    page.loggedIn = me.status === 200;
    page.me = page.loggedIn ? me.data : null;
    render(page.me);
    if (page.me) renderPayout(page.me.payout);
  }

  function start() {
    var params = new URLSearchParams(location.search);
    var login = params.get('login');
    if (login) {
      toast(login === 'denied' ? '你取消了微信授权，登录后才能参与' : '登录没有完成，请重试');
      params.delete('login');
      var query = params.toString();
      history.replaceState(null, '', location.pathname + (query ? '?' + query : ''));
    }
    var m = location.pathname.match(/^\/c\/([A-Za-z0-9_-]{1,64})\/?$/);
    if (!m) {
      // The home page: what a player who came without a campaign link can do.
      ui.stage.setAttribute('data-state', 'home');
      ui.name.textContent = '欢迎来抢红包';
      setStatus('从群聊或公众号打开活动，就能参与');
      ui.foot.textContent = '抢红包 · 抽好礼 · 好运连连';
      ui.action.hidden = true;
      return;
    }
    page.id = m[1];
    ui.action.addEventListener('click', act);
    pay.claim.addEventListener('click', claim);
    load();
  }

  start();
}());
