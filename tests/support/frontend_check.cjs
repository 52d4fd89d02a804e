// Load a UI-format workflow into the real ComfyUI frontend (headless Chromium) and report what it built.
// usage: node frontend_check.cjs BASE_URL WORKFLOW.json [SCREENSHOT.png]   (PLAYWRIGHT_CORE = module path)
const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const fs = require('fs');
(async () => {
  const [,, base, wfPath, shot] = process.argv;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 2400, height: 1150 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  await page.goto(base, { waitUntil: 'load' });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  const wf = JSON.parse(fs.readFileSync(wfPath, 'utf8'));
  const nodes = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
    const g = window.app.graph;
    const titleH = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
    return (g._nodes || g.nodes).map(n => {
      // the box the frontend draws: at least the node's computed size (slots + widgets), title bar above pos
      const need = n.computeSize ? n.computeSize() : n.size;
      const w = Math.max(n.size[0], need[0]), h = Math.max(n.size[1], need[1]);
      return { id: n.id, type: n.type, has_errors: !!n.has_errors, widgets: (n.widgets || []).map(w => w.name),
               box: [n.pos[0], n.pos[1] - titleH, n.pos[0] + w, n.pos[1] + h] };
    });
  }, wf);
  await page.waitForTimeout(1000);
  const missing = await page.evaluate(() => Array.from(document.querySelectorAll('.p-dialog'))
      .map(d => d.innerText).filter(t => /missing|not found/i.test(t)));
  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  if (shot) {
    await page.keyboard.press('Escape');
    await page.evaluate(() => document.querySelectorAll('.p-dialog-mask').forEach(m => m.remove()));
    await page.screenshot({ path: shot });
  }
  console.log(JSON.stringify({ errors, missing, nodes, prompt }));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
