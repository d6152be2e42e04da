// Browser test of the web console: Playwright (playwright-core) driving Debian's chromium,
// headless, against a three-controller cluster that tests/tests/console.rs started with
// `appliance up`. The Rust side owns the processes; this script asks it for faults over
// stdout ("FAULT kill", "FAULT restart") and waits for "OK" on stdin, so only the process
// that started a controller ever stops it.
//
// Env: CONSOLE_URL, ADMIN_PASSWORD, SHOTS (directory for the screenshots).
// Exit status 0 only when every step held; a failure prints the step and takes a screenshot.

import { chromium } from "playwright-core";
import readline from "node:readline";
import fs from "node:fs";

const url = process.env.CONSOLE_URL;
const password = process.env.ADMIN_PASSWORD;
const shots = process.env.SHOTS;
const WAIT = Number(process.env.STEP_TIMEOUT_MS || 120000);
fs.mkdirSync(shots, { recursive: true });

const lines = readline.createInterface({ input: process.stdin });
const inbox = [];
let waiter = null;
lines.on("line", (l) => { if (waiter) { const w = waiter; waiter = null; w(l); } else inbox.push(l); });
const nextLine = () => inbox.length ? Promise.resolve(inbox.shift()) : new Promise((r) => { waiter = r; });

async function fault(what) {
  console.log("FAULT " + what);
  const answer = await nextLine();
  if (answer !== "OK") throw new Error(`fault ${what} not done: ${answer}`);
}

let step = "launch";
const log = (m) => console.log("STEP " + m);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
const shot = (name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
const rows = (sel) => page.$$eval(sel, (es) => es.map((e) => ({ ...e.dataset })));

try {
  step = "a wrong password is refused";
  log(step);
  await page.goto(url);
  await page.fill("[data-testid=login-password]", "not-the-password");
  await page.click("[data-testid=login-submit]");
  await page.waitForFunction(() => /wrong user or password/.test(document.querySelector("[data-testid=login-error]").textContent), null, { timeout: WAIT });
  if (await page.isVisible("#app")) throw new Error("the console opened with a wrong password");
  await shot("01-login-refused");

  step = "log in; the dashboard shows 3 healthy controllers and the default volume";
  log(step);
  await page.fill("[data-testid=login-password]", password);
  await page.click("[data-testid=login-submit]");
  await page.waitForFunction(() => {
    const cs = [...document.querySelectorAll("#dash-controllers [data-testid=controller-row]")];
    const vs = [...document.querySelectorAll("#dash-volumes [data-testid=volume-row]")];
    return cs.length === 3 && cs.every((c) => c.dataset.state === "up")
      && vs.some((v) => v.dataset.name === "vol0" && v.dataset.health === "healthy")
      && document.querySelector("[data-testid=health]").textContent === "healthy";
  }, null, { timeout: WAIT });
  if ((await page.textContent("[data-testid=controllers-up]")).trim() !== "3 / 3") throw new Error("controllers-up card");
  await page.waitForTimeout(4500); // a few chart points
  await shot("02-dashboard");

  step = "create a volume through the form (client and server validation first)";
  log(step);
  await page.click("a[data-page=volumes]");
  await page.fill("[data-testid=nv-name]", "web1");
  await page.fill("[data-testid=nv-size]", "lots");
  await page.click("[data-testid=nv-submit]");
  await page.waitForFunction(() => /size such as/.test(document.querySelector("[data-field=size]").textContent), null, { timeout: WAIT });
  await page.fill("[data-testid=nv-size]", "64MiB");
  await page.click("[data-testid=nv-submit]");
  await page.waitForFunction(() => [...document.querySelectorAll("#volumes-table [data-testid=volume-row]")].some((v) => v.dataset.name === "web1"), null, { timeout: WAIT });
  await page.waitForFunction(() => /created as LUN 1/.test(document.querySelector("#nv-ok").textContent), null, { timeout: WAIT });
  // The server's own check: the name is taken now.
  await page.fill("[data-testid=nv-name]", "web1");
  await page.fill("[data-testid=nv-size]", "64MiB");
  await page.click("[data-testid=nv-submit]");
  await page.waitForFunction(() => /exists already/.test(document.querySelector("[data-field=name]").textContent), null, { timeout: WAIT });
  await shot("03-volumes");
  // Deleting asks for the name; a volume from the config has no delete button.
  if (await page.$("#volumes-table [data-testid=delete-volume][data-name=vol0]")) throw new Error("vol0 (from the config) offers delete");
  await page.fill("[data-testid=nv-name]", "scratch");
  await page.fill("[data-testid=nv-size]", "16MiB");
  await page.click("[data-testid=nv-submit]");
  await page.waitForSelector("#volumes-table [data-testid=delete-volume][data-name=scratch]", { timeout: WAIT });
  page.once("dialog", (d) => d.accept("scratch"));
  await page.click("#volumes-table [data-testid=delete-volume][data-name=scratch]");
  await page.waitForFunction(() => ![...document.querySelectorAll("#volumes-table [data-testid=volume-row]")].some((v) => v.dataset.name === "scratch")
    && /Volume scratch deleted/.test(document.querySelector("#nv-ok").textContent), null, { timeout: WAIT });

  step = "the other pages";
  log(step);
  for (const [p, name] of [["controllers", "04-controllers"], ["sessions", "05-sessions"], ["events", "06-events"]]) {
    await page.click(`a[data-page=${p}]`);
    await page.waitForTimeout(2500);
    await shot(name);
  }
  const events = await page.textContent("#events-table");
  if (!/volume web1 created/.test(events)) throw new Error("the events page lacks the volume creation");

  step = "kill controller 3: the console shows it down and the volume degraded";
  log(step);
  await page.click("a[data-page=dashboard]");
  await fault("kill");
  await page.waitForFunction(() => {
    const c3 = document.querySelector("#dash-controllers [data-testid=controller-row][data-id='3']");
    const v = [...document.querySelectorAll("#dash-volumes [data-testid=volume-row]")].find((x) => x.dataset.name === "vol0");
    return c3 && c3.dataset.state === "down" && v && v.dataset.health === "degraded"
      && document.querySelector("[data-testid=health]").textContent === "degraded";
  }, null, { timeout: WAIT });
  await page.waitForTimeout(2500);
  await shot("07-degraded");

  step = "writes while it is down, then it returns: a resync job with a moving progress bar";
  log(step);
  await fault("write-and-restart");
  await page.click("a[data-page=jobs]");
  await page.waitForSelector("#jobs-list [data-testid=job]", { timeout: WAIT });
  const first = Number(await page.getAttribute("#jobs-list [data-testid=job]", "data-done"));
  // The bar as drawn: its width over the track's, against done / total.
  const drawn = () => page.$eval("#jobs-list [data-testid=job]", (j) => {
    const bar = j.querySelector("[data-testid=job-bar]").getBoundingClientRect().width;
    const track = j.querySelector(".bar").getBoundingClientRect().width;
    return { shown: bar / track, actual: Number(j.dataset.done) / Number(j.dataset.total) };
  });
  const firstWidth = await drawn();
  if (Math.abs(firstWidth.shown - firstWidth.actual) > 0.08) throw new Error(`the bar shows ${firstWidth.shown} for ${firstWidth.actual}`);
  await shot("08-job");
  await page.waitForFunction((d) => {
    const j = document.querySelector("#jobs-list [data-testid=job]");
    return j && Number(j.dataset.done) > d;
  }, first, { timeout: WAIT, polling: 200 });
  const second = Number(await page.getAttribute("#jobs-list [data-testid=job]", "data-done"));
  await page.waitForTimeout(700); // the bar's transition
  const secondWidth = await drawn();
  if (secondWidth.shown <= firstWidth.shown) throw new Error(`the bar did not grow: ${firstWidth.shown} then ${secondWidth.shown}`);
  console.log(`JOB moved from ${first} to ${second} chunks; bar ${(100 * firstWidth.shown).toFixed(0)}% -> ${(100 * secondWidth.shown).toFixed(0)}%`);
  await shot("09-job-moving");

  step = "the resync ends and the cluster is healthy again";
  log(step);
  await page.click("a[data-page=dashboard]");
  await page.waitForFunction(() => document.querySelector("[data-testid=health]").textContent === "healthy", null, { timeout: 4 * WAIT });
  await shot("10-recovered");
  console.log("PASS");
} catch (e) {
  console.log(`FAIL at "${step}": ${e.message}`);
  try { await shot("failure"); } catch { /* best effort */ }
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
