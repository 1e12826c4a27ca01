/**
 * One notebook's connection to its kernel's UI channel: the `supermachine.vm` comm, opened only
 * when the kernel is the microVM kernel (kernel_info's implementation). It keeps the latest
 * state the kernel pushed and sends the actions, each answered by a result message.
 */
import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { PromiseDelegate, UUID } from '@lumino/coreutils';
import { ISignal, Signal } from '@lumino/signaling';

import { IMPLEMENTATION, IResult, IVmState, TARGET_NAME, parseState } from './model';

export type Action =
  | { request: 'snapshot'; name: string | null }
  | { request: 'restore'; ref: string }
  | { request: 'delete'; ref: string }
  | { request: 'rename'; ref: string; new_name: string };

export class VmChannel {
  constructor(readonly sessionContext: ISessionContext) {
    sessionContext.kernelChanged.connect(this._onKernelChanged, this);
    sessionContext.statusChanged.connect(this._onStatus, this);
    void sessionContext.ready.then(() => this._connect());
  }

  /** The latest state, or null: not a microVM kernel, or not connected yet. */
  get state(): IVmState | null {
    return this._state;
  }

  /** True while the notebook's kernel is a microVM kernel with its channel open. */
  get active(): boolean {
    return this._comm !== null;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Sends an action; resolves with the kernel's answer (the magic's text or its error). */
  act(action: Action): Promise<IResult> {
    const comm = this._comm;
    if (comm === null) {
      return Promise.reject(new Error('this notebook is not on a microVM kernel'));
    }
    const id = UUID.uuid4();
    const done = new PromiseDelegate<IResult>();
    this._pending.set(id, done);
    comm.send({ ...action, id });
    return done.promise;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._close();
    Signal.clearData(this);
  }

  private async _connect(): Promise<void> {
    const kernel = this.sessionContext.session?.kernel ?? null;
    if (this._disposed || kernel === null || this._comm !== null) {
      return;
    }
    let info: KernelMessage.IInfoReply;
    try {
      info = await kernel.info;
    } catch {
      return;
    }
    if (info.implementation !== IMPLEMENTATION || kernel !== this.sessionContext.session?.kernel) {
      return; // another kernel: nothing of ours appears
    }
    if (this._comm !== null || this._disposed) {
      return;
    }
    const comm = kernel.createComm(TARGET_NAME);
    comm.onMsg = msg => this._onMsg(msg.content.data);
    comm.onClose = () => {
      if (this._comm === comm) {
        this._comm = null;
        this._setState(null);
      }
    };
    this._comm = comm;
    comm.open({});
  }

  private _onMsg(data: unknown): void {
    const state = parseState(data);
    if (state !== null) {
      this._setState(state);
      return;
    }
    const result = data as IResult;
    if (result && result.type === 'result' && typeof result.id === 'string') {
      const pending = this._pending.get(result.id);
      if (pending) {
        this._pending.delete(result.id);
        pending.resolve(result);
      }
    }
  }

  private _setState(state: IVmState | null): void {
    this._state = state;
    this._changed.emit();
  }

  private _close(): void {
    const comm = this._comm;
    this._comm = null;
    for (const p of this._pending.values()) {
      p.reject(new Error('the kernel went away before it answered'));
    }
    this._pending.clear();
    if (comm !== null && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // the kernel is gone already
      }
    }
    this._setState(null);
  }

  private _onKernelChanged(): void {
    this._close();
    void this._connect();
  }

  private _onStatus(_: ISessionContext, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this._close(); // the kernel process goes away, and its comms with it
    } else if (status === 'idle' && this._comm === null) {
      void this._connect();
    }
  }

  private _comm: Kernel.IComm | null = null;
  private _state: IVmState | null = null;
  private _pending = new Map<string, PromiseDelegate<IResult>>();
  private _changed = new Signal<this, void>(this);
  private _disposed = false;
}
