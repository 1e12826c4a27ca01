/**
 * The JupyterLab / Notebook 7 extension of the Python (microVM) kernel: a status bar item (the
 * VM's accelerator, memory, uptime, restore marker), a "VM snapshots" panel (the notebook's
 * snapshot tree; take, restore, rename, delete), a "microVM pool" panel, commands with key
 * chords and a notebook toolbar button. Everything goes through the kernel's UI channel
 * (channel.ts ↔ supermachine_kernel/kernel/ui_channel.py), whose actions are the magics.
 * Notebooks on other kernels see nothing of it.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  Notification,
  ToolbarButton,
  showDialog
} from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { VmChannel, Action } from './channel';
import { restoreDiscardsState, validName } from './model';
import { IActions, PoolPanel, SnapshotPanel, StatusItem } from './views';

const PLUGIN_ID = 'supermachine-kernel-labextension:plugin';

export namespace CommandIDs {
  export const snapshot = 'supermachine:snapshot';
  export const restoreLatest = 'supermachine:restore-latest';
  export const showSnapshots = 'supermachine:show-snapshots';
  export const showPool = 'supermachine:show-pool';
}

const vmIcon = new LabIcon({
  name: 'supermachine:vm',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
    'd="M12 2 3 7v10l9 5 9-5V7l-9-5zm0 2.3 6.7 3.7L12 11.7 5.3 8 12 4.3zM5 9.7l6 3.3v6.6l-6-3.3V9.7zm8 9.9V13l6-3.3v6.6l-6 3.3z"/></svg>'
});

/** Runs actions for the panels and commands: confirmation first, the kernel's answer after. */
class Actions implements IActions {
  async snapshot(channel: VmChannel): Promise<void> {
    await this._run(channel, { request: 'snapshot', name: null }, 'Taking a snapshot of the VM…');
  }

  async restore(channel: VmChannel, ref: string): Promise<void> {
    if (restoreDiscardsState(channel.state)) {
      const answer = await showDialog({
        title: `Restore snapshot ${ref}?`,
        body:
          'The VM has changed since its last snapshot or restore. Restoring replaces it: ' +
          'variables, files and processes not in a snapshot are lost.',
        buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Restore' })]
      });
      if (!answer.button.accept) {
        return;
      }
    }
    await this._run(channel, { request: 'restore', ref }, `Restoring snapshot ${ref}…`);
  }

  async remove(channel: VmChannel, ref: string): Promise<void> {
    const answer = await showDialog({
      title: `Delete snapshot ${ref}?`,
      body: 'Its files are removed from disk; it cannot be restored afterwards.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (answer.button.accept) {
      await this._run(channel, { request: 'delete', ref }, `Deleting snapshot ${ref}…`);
    }
  }

  async rename(channel: VmChannel, ref: string): Promise<void> {
    const input = document.createElement('input');
    input.value = ref;
    input.className = 'jp-mod-styled jp-SupermachineRename-input';
    const body = new Widget({ node: input });
    const answer = await showDialog({
      title: `Rename snapshot ${ref}`,
      body,
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Rename' })],
      focusNodeSelector: 'input'
    });
    const name = input.value.trim();
    if (!answer.button.accept || name === ref || name === '') {
      return;
    }
    if (!validName(name)) {
      Notification.error(`"${name}" is not a snapshot name: use letters, digits, '.', '_' and '-'.`);
      return;
    }
    await this._run(channel, { request: 'rename', ref, new_name: name }, `Renaming ${ref}…`);
  }

  private async _run(channel: VmChannel, action: Action, pending: string): Promise<void> {
    const id = Notification.emit(pending, 'in-progress', { autoClose: false });
    try {
      const result = await channel.act(action);
      if (result.ok) {
        Notification.update({ id, message: result.output || 'Done.', type: 'success', autoClose: 5000 });
      } else {
        const e = result.error;
        const text = e ? `${e.ename}: ${e.evalue}${e.hint ? ` — ${e.hint}` : ''}` : 'failed';
        Notification.update({ id, message: text, type: 'error', autoClose: false });
      }
    } catch (err) {
      Notification.update({ id, message: String(err), type: 'error', autoClose: false });
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The Python (microVM) kernel in the UI: VM status, snapshot tree, pool stats.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const channels = new WeakMap<NotebookPanel, VmChannel>();
    const channelOf = (panel: NotebookPanel | null): VmChannel | null => {
      if (panel === null || panel.isDisposed) {
        return null;
      }
      let channel = channels.get(panel);
      if (channel === undefined) {
        channel = new VmChannel(panel.sessionContext);
        channels.set(panel, channel);
        const ch = channel;
        panel.disposed.connect(() => ch.dispose());
        ch.changed.connect(() => {
          if (ch.state !== null) {
            addPanels();
          }
          app.commands.notifyCommandChanged();
        });
      }
      return channel;
    };
    const actions = new Actions();

    const status = new StatusItem();
    const snapshots = new SnapshotPanel(actions);
    snapshots.title.icon = vmIcon;
    const pool = new PoolPanel();
    pool.title.icon = vmIcon;
    // The side panels appear once a notebook runs on a microVM kernel: a server without one
    // shows nothing new.
    let panelsAdded = false;
    const addPanels = () => {
      if (!panelsAdded) {
        panelsAdded = true;
        app.shell.add(snapshots, 'right', { rank: 900 });
        app.shell.add(pool, 'right', { rank: 901 });
      }
    };
    if (statusBar) {
      statusBar.registerStatusItem(PLUGIN_ID + ':status', {
        item: status,
        align: 'left',
        rank: 5,
        isActive: () => status.channel?.state != null,
        activeStateChanged: undefined
      });
    }

    const follow = () => {
      const channel = channelOf(tracker.currentWidget);
      status.channel = channel;
      snapshots.channel = channel;
      pool.channel = channel;
      app.commands.notifyCommandChanged();
    };
    tracker.currentChanged.connect(follow);
    tracker.widgetAdded.connect((_, panel) => void channelOf(panel));
    follow();

    const current = (): VmChannel | null => {
      const channel = channelOf(tracker.currentWidget);
      return channel !== null && channel.state !== null ? channel : null;
    };
    app.commands.addCommand(CommandIDs.snapshot, {
      label: 'Snapshot the microVM now',
      caption: 'Take a whole-VM snapshot of this notebook (%snapshot)',
      icon: args => (args.toolbar ? vmIcon : undefined),
      isEnabled: () => current() !== null,
      execute: async () => {
        const channel = current();
        if (channel) {
          await actions.snapshot(channel);
        }
      }
    });
    app.commands.addCommand(CommandIDs.restoreLatest, {
      label: 'Restore the current microVM snapshot',
      caption: 'Go back to the snapshot the session came from (%restore)',
      isEnabled: () => current()?.state?.head != null || (current()?.state?.snapshots.length ?? 0) > 0,
      execute: async () => {
        const channel = current();
        const state = channel?.state;
        if (!channel || !state) {
          return;
        }
        const ref = state.head ?? state.snapshots[state.snapshots.length - 1]?.ref;
        if (ref) {
          await actions.restore(channel, ref);
        }
      }
    });
    app.commands.addCommand(CommandIDs.showSnapshots, {
      label: 'Show VM snapshots',
      isEnabled: () => panelsAdded,
      execute: () => app.shell.activateById(snapshots.id)
    });
    app.commands.addCommand(CommandIDs.showPool, {
      label: 'Show microVM pool',
      isEnabled: () => panelsAdded,
      execute: () => app.shell.activateById(pool.id)
    });
    const keys: [string, string[]][] = [
      [CommandIDs.snapshot, ['Alt V', 'S']],
      [CommandIDs.restoreLatest, ['Alt V', 'R']],
      [CommandIDs.showSnapshots, ['Alt V', 'T']],
      [CommandIDs.showPool, ['Alt V', 'P']]
    ];
    for (const [command, chord] of keys) {
      app.commands.addKeyBinding({ command, keys: chord, selector: 'body' });
      palette?.addItem({ command, category: 'microVM' });
    }

    app.docRegistry.addWidgetExtension('Notebook', {
      createNew: (panel: NotebookPanel) => {
        const channel = channelOf(panel);
        const button = new ToolbarButton({
          icon: vmIcon,
          label: 'Snapshot',
          tooltip: 'Snapshot the microVM now (Alt V, S)',
          className: 'jp-SupermachineSnapshotButton',
          onClick: () => {
            if (channel && channel.state) {
              void actions.snapshot(channel);
            }
          }
        });
        const show = () => {
          button.setHidden(!(channel && channel.state));
        };
        channel?.changed.connect(show);
        show();
        panel.toolbar.insertItem(10, 'supermachineSnapshot', button);
        return button;
      }
    });
  }
};

export default plugin;
