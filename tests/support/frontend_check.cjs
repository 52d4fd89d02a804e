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
  const page = await browser.newPage({ viewport: { width: 1800, height: 1000 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  await page.goto(base, { waitUntil: 'load' });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  const wf = JSON.parse(fs.readFileSync(wfPath, 'utf8'));
  const nodes = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
    const g = window.app.graph;
    return (g._nodes || g.nodes).map(n => ({ id: n.id, type: n.type, has_errors: !!n.has_errors,
      widgets: (n.widgets || []).map(w => w.name) }));
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
