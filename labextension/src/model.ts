/**
 * The state the kernel's UI channel sends (supermachine_kernel/kernel/ui_channel.py) and the
 * pure logic the views build on: the snapshot tree, the current position in it, the texts of
 * the status item. No JupyterLab imports here, so jest tests it on its own.
 */

/** The comm target the kernel answers (kernel/ui_channel.py: TARGET_NAME). */
export const TARGET_NAME = 'supermachine.vm';
/** kernel_info's `implementation` for the microVM kernel (kernel/microvm.py). */
export const IMPLEMENTATION = 'supermachine-kernel';
export const PROTOCOL_VERSION = 1;

export interface ISnapshot {
  name: string;
  ref: string;
  created: number; // unix seconds
  size_bytes: number;
  parent: string | null;
  execution_count: number | null;
  took_s: number | null;
}

export interface IVm {
  running: boolean;
  id?: string | null;
  accelerator?: string | null;
  started?: number | null; // unix seconds the VM's process started
  origin?: string;
  origin_time?: number | null;
  restored?: boolean;
  memory_total_bytes?: number;
  memory_used_bytes?: number;
}

export interface IVmState {
  protocol: number;
  group: { key: string; label: string };
  head: string | null;
  dirty: boolean;
  execution_count: number;
  snapshots: ISnapshot[];
  vm: IVm;
  pool: { [key: string]: unknown };
}

export interface IResult {
  type: 'result';
  id: string | number | null;
  request: string;
  ok: boolean;
  output: string;
  error: { ename: string; evalue: string; hint: string } | null;
}

/** One node of the snapshot tree, in display order (depth-first, oldest child first). */
export interface ITreeRow {
  snapshot: ISnapshot;
  depth: number;
  /** The snapshot the running session came from. */
  current: boolean;
  /** On the path from a root to the current snapshot. */
  onCurrentPath: boolean;
  /** Its parent is not in this notebook's snapshots (deleted, or another group's). */
  orphan: boolean;
}

/** Checks a message from the kernel; returns the state or null if it is not one we know. */
export function parseState(data: unknown): IVmState | null {
  if (typeof data !== 'object' || data === null) {
    return null;
  }
  const msg = data as { type?: unknown; state?: unknown };
  if (msg.type !== 'state' || typeof msg.state !== 'object' || msg.state === null) {
    return null;
  }
  const s = msg.state as IVmState;
  if (s.protocol !== PROTOCOL_VERSION || !Array.isArray(s.snapshots) || !s.vm) {
    return null;
  }
  return s;
}

/** The snapshot tree: parent before child, siblings oldest first, depth for indentation. */
export function buildTree(snapshots: ISnapshot[], head: string | null): ITreeRow[] {
  const byName = new Map(snapshots.map(s => [s.name, s]));
  const children = new Map<string | null, ISnapshot[]>();
  for (const s of snapshots) {
    const key = s.parent !== null && byName.has(s.parent) ? s.parent : null;
    const list = children.get(key) ?? [];
    list.push(s);
    children.set(key, list);
  }
  for (const list of children.values()) {
    list.sort((a, b) => a.created - b.created || a.name.localeCompare(b.name));
  }
  const path = new Set(ancestry(snapshots, head));
  const rows: ITreeRow[] = [];
  const seen = new Set<string>();
  const visit = (s: ISnapshot, depth: number) => {
    if (seen.has(s.name)) {
      return; // a cycle in a hand-edited index: show each snapshot once
    }
    seen.add(s.name);
    rows.push({
      snapshot: s,
      depth,
      current: s.name === head,
      onCurrentPath: path.has(s.name),
      orphan: s.parent !== null && !byName.has(s.parent)
    });
    for (const child of children.get(s.name) ?? []) {
      visit(child, depth + 1);
    }
  };
  for (const root of children.get(null) ?? []) {
    visit(root, 0);
  }
  for (const s of snapshots) {
    visit(s, 0); // anything only reachable through a cycle
  }
  return rows;
}

/** head, its parent, … back to a root (names known to this notebook only). */
export function ancestry(snapshots: ISnapshot[], head: string | null): string[] {
  const parents = new Map(snapshots.map(s => [s.name, s.parent]));
  const chain: string[] = [];
  let name = head;
  while (name !== null && parents.has(name) && !chain.includes(name)) {
    chain.push(name);
    name = parents.get(name) ?? null;
  }
  return chain;
}

/** Whether restoring discards VM state that no snapshot holds (the confirm dialog's question). */
export function restoreDiscardsState(state: IVmState | null): boolean {
  return state === null || state.dirty;
}

/** A snapshot or file size as %snapshots prints it. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let n = bytes;
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

/** "42 s", "3 min 5 s", "2 h 7 min". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ${s % 60} s`;
  }
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** The VM's uptime at `nowSeconds` (the kernel sends the start time; the browser counts). */
export function uptime(vm: IVm, nowSeconds: number): number | null {
  return vm.started ? Math.max(0, nowSeconds - vm.started) : null;
}

/** The status bar text: "TCG · 120/512 MiB · up 3 min 5 s · ⟲ s1". */
export function statusText(state: IVmState, nowSeconds: number): string {
  const vm = state.vm;
  if (!vm.running) {
    return 'microVM: starting';
  }
  const parts = [(vm.accelerator ?? '?').toUpperCase()];
  if (vm.memory_total_bytes) {
    const mib = 1 << 20;
    parts.push(
      `${Math.round((vm.memory_used_bytes ?? 0) / mib)}/${Math.round(vm.memory_total_bytes / mib)} MiB`
    );
  }
  const up = uptime(vm, nowSeconds);
  if (up !== null) {
    parts.push(`up ${formatDuration(up)}`);
  }
  const from = restoredFrom(state);
  if (from !== null) {
    parts.push(`restored from ${from}`);
  }
  return parts.join(' · ');
}

/** The snapshot the running VM was restored from, or null (it came from the pool). */
export function restoredFrom(state: IVmState): string | null {
  if (!state.vm.restored) {
    return null;
  }
  const m = /restored from '([^']+)'/.exec(state.vm.origin ?? '');
  return m ? m[1] : state.head;
}

/** The next generated name the kernel would pick is its business; the UI proposes none. */
export function validName(name: string): boolean {
  return /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name);
}

/** A pool figure for display ("-" when the kernel has no pool or no value). */
export function poolRows(pool: { [key: string]: unknown }): [string, string][] {
  const fmt = (v: unknown): string => {
    if (v === null || v === undefined) {
      return '-';
    }
    if (Array.isArray(v)) {
      return v.length ? v.slice(-5).map(x => `${Math.round(Number(x))}`).join(', ') + ' ms' : '-';
    }
    return String(v);
  };
  const rows: [string, string][] = [];
  if (pool.has_pool === false) {
    rows.push(['pool', 'none (this kernel boots its VMs without one)']);
  } else {
    for (const k of ['alive', 'in_use', 'idle', 'waiting', 'min', 'max', 'creating']) {
      rows.push([k, fmt(pool[k])]);
    }
  }
  rows.push(['accelerator', fmt(pool.accelerator)]);
  rows.push(['current VM', fmt(pool.vm)]);
  rows.push(['recent pool acquires', fmt(pool.recent_acquire_ms)]);
  rows.push(['recent pool restores', fmt(pool.recent_create_ms)]);
  rows.push(['recent %restore', fmt(pool.recent_restore_ms)]);
  rows.push(['recent %snapshot', fmt(pool.recent_snapshot_ms)]);
  return rows;
}
