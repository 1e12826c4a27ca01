// The extension end to end in Debian's chromium (playwright-core with executablePath): a
// notebook on "Python (microVM)" shows the status item; a snapshot taken from the panel, a
// variable changed, a restore from the panel (through its confirm dialog) brings the variable
// back; the pool panel shows the figures; a C loop that ignores the interrupt ends at the second
// interrupt (pressed I,I twice) with the GuestStuck error and the next cell runs; a notebook on
// another kernel shows none of it.
// Run by tests/lab/test_e2e.py: node e2e.js URL NOTEBOOK OTHER_NOTEBOOK|- OUT_DIR [notebook7]
// Prints one JSON line per check; exits 1 on the first failure (with a screenshot).
const { chromium } = require('playwright-core');
const path = require('path');

const [url, notebook, other, out, nb7] = process.argv.slice(2);
const LONG = Number(process.env.E2E_TIMEOUT_MS || 300000); // a TCG VM on a loaded 2-core machine
let page;

function step(name) {
  console.log(JSON.stringify({ step: name, at: new Date().toISOString() }));
}

function check(name, detail) {
  console.log(JSON.stringify({ check: name, ok: true, detail }));
}

async function shot(name) {
  await page.screenshot({ path: path.join(out, `${name}.png`), fullPage: true });
}

async function runCell(i) {
  // Runs cell i and waits for its execution count; presses again if the keypress was lost
  // (a notebook still connecting its kernel drops it).
  const prompt = () => page.evaluate(n => {
    const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[n];
    return cell ? cell.querySelector('.jp-InputPrompt').textContent : '';
  }, i);
  for (let attempt = 0; attempt < 5; attempt++) {
    await page.locator('.jp-Notebook .jp-Cell').nth(i).locator('.jp-InputArea-editor').click();
    await page.keyboard.press('Shift+Enter');
    const deadline = Date.now() + (attempt < 4 ? 20000 : LONG);
    while (Date.now() < deadline) {
      const text = await prompt();
      if (/\[\d+\]/.test(text)) {
        return;
      }
      if (/\[\*\]/.test(text)) {
        await page.waitForFunction(n => /\[\d+\]/.test(document.querySelectorAll('.jp-Notebook .jp-Cell')[n].querySelector('.jp-InputPrompt').textContent), i, { timeout: LONG });
        return;
      }
      await page.waitForTimeout(500);
    }
  }
  throw new Error(`cell ${i} did not run`);
}

function cellText(i) {
  return page.locator('.jp-Notebook .jp-Cell').nth(i).locator('.jp-OutputArea').textContent();
}

async function interruptTwice(i) {
  // Starts cell i, and once it runs, presses the interrupt chord (I, I) twice in command mode,
  // as a user does when the first interrupt does not stop the cell.
  await page.locator('.jp-Notebook .jp-Cell').nth(i).locator('.jp-InputArea-editor').click();
  await page.keyboard.press('Shift+Enter');
  await page.waitForFunction(n => /\[\*\]/.test(document.querySelectorAll('.jp-Notebook .jp-Cell')[n].querySelector('.jp-InputPrompt').textContent), i, { timeout: LONG });
  await page.waitForTimeout(3000);
  for (let k = 0; k < 2; k++) {
    await page.locator('.jp-Notebook .jp-Cell').nth(i).locator('.jp-InputPrompt').click();
    await page.keyboard.press('Escape');
    await page.keyboard.press('i');
    await page.keyboard.press('i');
    await page.waitForTimeout(1500);
  }
  await page.waitForFunction(n => /\[\d+\]/.test(document.querySelectorAll('.jp-Notebook .jp-Cell')[n].querySelector('.jp-InputPrompt').textContent), i, { timeout: LONG });
}

async function openTab(id) {
  await page.click(`.lm-TabBar-tab[data-id="${id}"]`);
  await page.waitForSelector(`#${id}:not(.lm-mod-hidden)`, { timeout: 30000 });
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-first-run']
  });
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  // Errors thrown by our bundle (its URL names the extension) fail the test; others are
  // JupyterLab's or Notebook 7's own and are only printed.
  page.on('pageerror', e => {
    const text = `${e}\n${e.stack || ''}`;
    console.log(JSON.stringify({ pageerror: text }));
    if (/supermachine/i.test(text)) {
      errors.push(text);
    }
  });
  try {
    step('open notebook');
    await page.goto(`${url}lab/tree/${notebook}`);
    await page.waitForSelector('.jp-Notebook', { timeout: 120000 });
    await page.waitForSelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', { timeout: LONG });
    step('run x = 1');
    await runCell(0); // x = 1
    step('wait for the status item');
    const status = await page.waitForSelector('.jp-SupermachineStatus[data-active="true"]', { timeout: LONG });
    await page.waitForFunction(() => /MiB/.test(document.querySelector('.jp-SupermachineStatus').textContent), null, { timeout: LONG });
    const text = await status.textContent();
    if (!/(TCG|KVM) · \d+\/\d+ MiB · up \d+/.test(text)) {
      throw new Error(`status item says ${JSON.stringify(text)}`);
    }
    check('status item', text);
    await page.waitForSelector('.jp-SupermachineSnapshotButton', { state: 'visible', timeout: 30000 });
    check('toolbar button');
    await shot('1-status');

    await openTab('supermachine-snapshots');
    await page.click('.jp-SupermachinePanel-take');
    const node = await page.waitForSelector('.jp-SupermachinePanel-node.jp-mod-current', { timeout: LONG });
    const name = await node.getAttribute('data-name');
    check('snapshot from the panel', name);
    await shot('2-snapshot-taken');

    await runCell(1); // x = 2
    await page.waitForFunction(() => /changes since/.test(document.querySelector('.jp-SupermachinePanel-position').textContent), null, { timeout: LONG });
    await page.click(`.jp-SupermachinePanel-node[data-name="${name}"] .jp-SupermachinePanel-restore`);
    await page.waitForSelector('.jp-Dialog', { timeout: 30000 });
    await shot('3-restore-confirm');
    await page.click('.jp-Dialog .jp-Dialog-button.jp-mod-warn');
    check('restore confirm dialog');
    await page.waitForSelector(`.jp-SupermachineStatus[data-restored="${name}"]`, { timeout: LONG });
    check('status item marks the restore', await page.textContent('.jp-SupermachineStatus'));

    await runCell(2); // print('x is', x)
    await page.waitForFunction(() => {
      const cells = document.querySelectorAll('.jp-Notebook .jp-Cell');
      return cells[2] && /x is \d/.test(cells[2].textContent);
    }, null, { timeout: LONG });
    const printed = (await page.locator('.jp-Notebook .jp-Cell').nth(2).locator('.jp-OutputArea').textContent()).trim();
    if (printed !== 'x is 1') {
      throw new Error(`after the restore the notebook printed ${JSON.stringify(printed)}`);
    }
    check('variable restored', printed);
    await shot('4-restored');

    await openTab('supermachine-pool');
    const accel = await page.textContent('#supermachine-pool tr[data-key="accelerator"] .jp-SupermachinePool-value');
    if (!/^(tcg|kvm)$/.test(accel)) {
      throw new Error(`pool panel accelerator ${JSON.stringify(accel)}`);
    }
    check('pool panel', accel);
    await shot('5-pool');

    step('a C loop that ignores the interrupt');
    await interruptTwice(3); // sum(range(10**13))
    const stuck = await cellText(3);
    if (!/GuestStuck/.test(stuck) || !/second interrupt/.test(stuck)) {
      throw new Error(`after two interrupts the cell shows ${JSON.stringify(stuck.slice(-500))}`);
    }
    check('second interrupt ends a stuck cell', stuck.trim().slice(-300));
    await runCell(4); // print('after', 1 + 1)
    await page.waitForFunction(() => /after 2/.test(document.querySelectorAll('.jp-Notebook .jp-Cell')[4].textContent), null, { timeout: LONG });
    check('the kernel runs the next cell');
    await shot('5b-stuck-cell');

    if (other !== '-') {
      step('open a notebook on another kernel');
      await page.goto(`${url}lab/tree/${other}`);
      await page.waitForFunction(
        () => Array.from(document.querySelectorAll('.jp-StatusBar-TextItem')).some(e => /ipykernel\) \| Idle/.test(e.textContent)),
        null, { timeout: LONG });
      await page.waitForTimeout(3000);
      const visible = await page.isVisible('.jp-SupermachineStatus[data-active="true"]');
      const button = await page.isVisible('.jp-SupermachineSnapshotButton');
      if (visible || button) {
        throw new Error('another kernel shows the microVM status item or button');
      }
      check('other kernel sees nothing');
      await shot('6-other-kernel');
    }
    if (nb7 === 'notebook7') {
      // Notebook 7: the same notebook (same kernel); the toolbar button, and the snapshots
      // panel opened by its key chord in Notebook 7's right side panel.
      if (errors.length) {
        throw new Error(`page errors: ${errors.join('; ')}`);
      }
      step('open the notebook in Notebook 7');
      await page.goto(`${url}notebooks/${notebook}`);
      await page.waitForSelector('.jp-Notebook', { timeout: 120000 });
      await page.waitForSelector('.jp-SupermachineSnapshotButton', { state: 'visible', timeout: LONG });
      await page.locator('.jp-Notebook .jp-Cell').first().click();
      await page.keyboard.press('Escape');
      await page.keyboard.press('Alt+V');
      await page.keyboard.press('T');
      await page.waitForSelector('#supermachine-snapshots .jp-SupermachinePanel-node.jp-mod-current', { state: 'visible', timeout: 60000 });
      check('notebook 7 panel and button');
      await shot('7-notebook7');
    }
    if (errors.length) {
      throw new Error(`page errors: ${errors.join('; ')}`);
    }
  } catch (e) {
    console.log(JSON.stringify({ check: 'failed', ok: false, detail: String(e && e.stack || e) }));
    await shot('failure').catch(() => {});
    await browser.close();
    process.exit(1);
  }
  await browser.close();
})();
