import {
  ISnapshot,
  IVmState,
  ancestry,
  buildTree,
  formatDuration,
  formatSize,
  parseState,
  poolRows,
  restoreDiscardsState,
  restoredFrom,
  statusText,
  validName
} from '../model';

function snap(name: string, parent: string | null, created: number): ISnapshot {
  return { name, ref: name, created, size_bytes: 1024, parent, execution_count: null, took_s: null };
}

function state(over: Partial<IVmState> = {}): IVmState {
  return {
    protocol: 1,
    group: { key: 'nb-1', label: 'nb.ipynb' },
    head: null,
    dirty: false,
    execution_count: 0,
    snapshots: [],
    vm: { running: true, accelerator: 'tcg', started: 1000, origin: 'from the kernel\'s pool', restored: false },
    pool: {},
    ...over
  };
}

describe('parseState', () => {
  it('accepts a state message of our protocol', () => {
    const s = state();
    expect(parseState({ type: 'state', state: s })).toEqual(s);
  });
  it('refuses anything else', () => {
    expect(parseState(null)).toBeNull();
    expect(parseState({ type: 'result' })).toBeNull();
    expect(parseState({ type: 'state', state: { ...state(), protocol: 2 } })).toBeNull();
    expect(parseState({ type: 'state', state: { protocol: 1, snapshots: 'x', vm: {} } })).toBeNull();
  });
});

describe('buildTree', () => {
  const snaps = [snap('a', null, 1), snap('b', 'a', 2), snap('c', 'a', 3), snap('d', 'b', 4), snap('e', null, 5)];

  it('orders parent before child, siblings oldest first, with depths', () => {
    const rows = buildTree(snaps, 'd');
    expect(rows.map(r => [r.snapshot.name, r.depth])).toEqual([
      ['a', 0], ['b', 1], ['d', 2], ['c', 1], ['e', 0]
    ]);
  });

  it('marks the current snapshot and the path to it', () => {
    const rows = buildTree(snaps, 'd');
    expect(rows.filter(r => r.current).map(r => r.snapshot.name)).toEqual(['d']);
    expect(rows.filter(r => r.onCurrentPath).map(r => r.snapshot.name)).toEqual(['a', 'b', 'd']);
  });

  it('shows a snapshot whose parent is gone as a root, marked', () => {
    const rows = buildTree([snap('x', 'deleted', 1), snap('y', 'x', 2)], null);
    expect(rows.map(r => [r.snapshot.name, r.depth, r.orphan])).toEqual([
      ['x', 0, true], ['y', 1, false]
    ]);
  });

  it('shows every snapshot once even when parents form a cycle', () => {
    const rows = buildTree([snap('p', 'q', 1), snap('q', 'p', 2)], 'p');
    expect(rows.map(r => r.snapshot.name).sort()).toEqual(['p', 'q']);
    expect(ancestry([snap('p', 'q', 1), snap('q', 'p', 2)], 'p')).toEqual(['p', 'q']);
  });
});

describe('status', () => {
  it('shows accelerator, memory, uptime from the start time', () => {
    const s = state({ vm: { running: true, accelerator: 'kvm', started: 1000, memory_total_bytes: 512 << 20, memory_used_bytes: 100 << 20 } });
    expect(statusText(s, 1065)).toBe('KVM · 100/512 MiB · up 1 min 5 s');
  });
  it('marks a restored VM with its snapshot', () => {
    const s = state({ head: 's2', vm: { running: true, accelerator: 'tcg', started: 10, restored: true, origin: "restored from 's1'" } });
    expect(restoredFrom(s)).toBe('s1');
    expect(statusText(s, 20)).toBe("TCG · up 10 s · restored from s1");
    expect(restoredFrom(state())).toBeNull();
  });
  it('says when the VM is not there yet', () => {
    expect(statusText(state({ vm: { running: false } }), 0)).toBe('microVM: starting');
  });
});

describe('restore confirmation', () => {
  it('asks only when the VM changed since its last snapshot or restore', () => {
    expect(restoreDiscardsState(state({ dirty: true }))).toBe(true);
    expect(restoreDiscardsState(state({ dirty: false }))).toBe(false);
    expect(restoreDiscardsState(null)).toBe(true);
  });
});

describe('formatting', () => {
  it('sizes as the kernel prints them', () => {
    expect(formatSize(512)).toBe('512 B');
    expect(formatSize(1536)).toBe('1.5 KiB');
    expect(formatSize(3 * 2 ** 40)).toBe('3072.0 GiB');
  });
  it('durations', () => {
    expect(formatDuration(5.9)).toBe('5 s');
    expect(formatDuration(3 * 3600 + 7 * 60)).toBe('3 h 7 min');
  });
  it('snapshot names as the store accepts them', () => {
    expect(validName('run-2.b_c')).toBe(true);
    expect(validName('../x')).toBe(false);
    expect(validName('')).toBe(false);
    expect(validName('a'.repeat(65))).toBe(false);
  });
  it('pool rows say when there is no pool', () => {
    expect(poolRows({ has_pool: false, accelerator: 'tcg' })[0]).toEqual(['pool', 'none (this kernel boots its VMs without one)']);
    const rows = new Map(poolRows({ has_pool: true, alive: 2, recent_acquire_ms: [1.4, 20.6] }));
    expect(rows.get('alive')).toBe('2');
    expect(rows.get('recent pool acquires')).toBe('1, 21 ms');
    expect(rows.get('max')).toBe('-');
  });
});
