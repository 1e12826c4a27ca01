/**
 * The extension's widgets, plain DOM on Lumino: the status bar item, the "VM snapshots" panel
 * and the "microVM pool" panel. Each shows one `VmChannel` (the current notebook's) and
 * re-renders when it changes; the panels hand actions to `Actions` (index.ts), which asks
 * for confirmation and reports the kernel's answer.
 */
import { Widget } from '@lumino/widgets';

import { VmChannel } from './channel';
import {
  ITreeRow,
  IVmState,
  buildTree,
  formatSize,
  poolRows,
  restoredFrom,
  statusText
} from './model';

export interface IActions {
  snapshot(channel: VmChannel): Promise<void>;
  restore(channel: VmChannel, ref: string): Promise<void>;
  remove(channel: VmChannel, ref: string): Promise<void>;
  rename(channel: VmChannel, ref: string): Promise<void>;
}

/** A widget that follows one channel at a time (the current notebook's). */
abstract class ChannelView extends Widget {
  get channel(): VmChannel | null {
    return this._channel;
  }

  set channel(channel: VmChannel | null) {
    if (this._channel === channel) {
      return;
    }
    this._channel?.changed.disconnect(this.render, this);
    this._channel = channel;
    channel?.changed.connect(this.render, this);
    this.render();
  }

  abstract render(): void;

  dispose(): void {
    this.channel = null;
    super.dispose();
  }

  protected _channel: VmChannel | null = null;
}

/** Status bar: accelerator, guest memory, uptime, restore marker; hidden for other kernels. */
export class StatusItem extends ChannelView {
  constructor() {
    super();
    this.addClass('jp-SupermachineStatus');
    this.node.title = 'microVM of this notebook';
    this._timer = window.setInterval(() => this.render(), 1000);
  }

  render(): void {
    const state = this._channel?.state ?? null;
    const visible = state !== null;
    this.node.style.display = visible ? '' : 'none';
    this.node.dataset.active = visible ? 'true' : 'false';
    if (state === null) {
      this.node.textContent = '';
      return;
    }
    const from = restoredFrom(state);
    this.node.dataset.restored = from ?? '';
    this.node.dataset.accelerator = state.vm.accelerator ?? '';
    this.node.textContent = `⬡ ${statusText(state, Date.now() / 1000)}`;
    this.node.title =
      `microVM ${state.vm.id ?? ''}: ${state.vm.origin ?? ''}` +
      (state.head ? `; current snapshot ${state.head}` : '');
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  private _timer: number;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  cls: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (cls) {
    e.className = cls;
  }
  if (text !== undefined) {
    e.textContent = text;
  }
  return e;
}

function when(t: number): string {
  return new Date(t * 1000).toLocaleString();
}

/** The "VM snapshots" side panel: the tree, the current position, the actions. */
export class SnapshotPanel extends ChannelView {
  constructor(private _actions: IActions) {
    super();
    this.id = 'supermachine-snapshots';
    this.addClass('jp-SupermachinePanel');
    this.title.caption = 'VM snapshots';
    this.render();
  }

  render(): void {
    const channel = this._channel;
    const state = channel?.state ?? null;
    const node = this.node;
    node.textContent = '';
    node.appendChild(el('h2', '', 'VM snapshots'));
    if (channel === null || state === null) {
      node.appendChild(
        el('p', 'jp-SupermachinePanel-empty', 'Open a notebook on a Python (microVM) kernel to see its snapshots.')
      );
      return;
    }
    node.appendChild(el('div', 'jp-SupermachinePanel-group', `Notebook group ${state.group.key}: ${state.group.label}`));
    const bar = el('div', 'jp-SupermachinePanel-toolbar');
    const take = el('button', 'jp-mod-styled jp-mod-accept jp-SupermachinePanel-take', 'Snapshot now');
    take.onclick = () => void this._actions.snapshot(channel);
    bar.appendChild(take);
    node.appendChild(bar);
    node.appendChild(this._position(state));
    const rows = buildTree(state.snapshots, state.head);
    if (rows.length === 0) {
      node.appendChild(el('p', 'jp-SupermachinePanel-empty', 'No snapshots yet: take one with "Snapshot now" or %snapshot.'));
      return;
    }
    const list = el('ul', 'jp-SupermachinePanel-tree');
    for (const row of rows) {
      list.appendChild(this._row(channel, row));
    }
    node.appendChild(list);
  }

  private _position(state: IVmState): HTMLElement {
    const p = el('div', 'jp-SupermachinePanel-position');
    const head = state.head ? `at snapshot ${state.head}` : 'at the fresh start (no snapshot yet)';
    p.textContent = `Current position: ${head}${state.dirty ? ', with changes since' : ''}`;
    return p;
  }

  private _row(channel: VmChannel, row: ITreeRow): HTMLElement {
    const s = row.snapshot;
    const li = el('li', 'jp-SupermachinePanel-node');
    li.dataset.name = s.name;
    li.style.paddingLeft = `${row.depth * 16}px`;
    if (row.current) {
      li.classList.add('jp-mod-current');
    }
    if (row.onCurrentPath) {
      li.classList.add('jp-mod-onpath');
    }
    const label = el('div', 'jp-SupermachinePanel-label');
    label.appendChild(el('span', 'jp-SupermachinePanel-marker', row.current ? '●' : row.onCurrentPath ? '◉' : '○'));
    label.appendChild(el('span', 'jp-SupermachinePanel-name', s.name));
    if (row.orphan) {
      label.appendChild(el('span', 'jp-SupermachinePanel-orphan', ` (parent ${s.parent} deleted)`));
    }
    li.appendChild(label);
    const cell = s.execution_count ? ` · cell [${s.execution_count}]` : '';
    li.appendChild(el('div', 'jp-SupermachinePanel-meta', `${when(s.created)} · ${formatSize(s.size_bytes)}${cell}`));
    const buttons = el('div', 'jp-SupermachinePanel-actions');
    const button = (text: string, cls: string, run: () => Promise<void>) => {
      const b = el('button', `jp-mod-styled ${cls}`, text);
      b.onclick = () => void run();
      buttons.appendChild(b);
    };
    button('Restore', 'jp-SupermachinePanel-restore', () => this._actions.restore(channel, s.ref));
    button('Rename', 'jp-SupermachinePanel-rename', () => this._actions.rename(channel, s.ref));
    button('Delete', 'jp-mod-warn jp-SupermachinePanel-delete', () => this._actions.remove(channel, s.ref));
    li.appendChild(buttons);
    return li;
  }
}

/** The pool/VM panel: the %pool figures, live. */
export class PoolPanel extends ChannelView {
  constructor() {
    super();
    this.id = 'supermachine-pool';
    this.addClass('jp-SupermachinePanel');
    this.title.caption = 'microVM pool';
    this.render();
  }

  render(): void {
    const state = this._channel?.state ?? null;
    const node = this.node;
    node.textContent = '';
    node.appendChild(el('h2', '', 'microVM pool'));
    if (state === null) {
      node.appendChild(el('p', 'jp-SupermachinePanel-empty', 'Open a notebook on a Python (microVM) kernel to see its VM pool.'));
      return;
    }
    const table = el('table', 'jp-SupermachinePool-table');
    for (const [k, v] of poolRows(state.pool)) {
      const tr = el('tr', '');
      tr.dataset.key = k;
      tr.appendChild(el('td', 'jp-SupermachinePool-key', k));
      tr.appendChild(el('td', 'jp-SupermachinePool-value', v));
      table.appendChild(tr);
    }
    node.appendChild(table);
  }
}
