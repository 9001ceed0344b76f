package director

import "testing"

func TestParseNotifyLine(t *testing.T) {
	ev, err := ParseNotifyLine(`INSTANCE "VI_out" MASTER 150` + "\n")
	if err != nil || ev.Kind != "INSTANCE" || ev.Name != "VI_out" || ev.State != "MASTER" || ev.Priority != 150 {
		t.Fatalf("%+v %v", ev, err)
	}
	ev, err = ParseNotifyLine(`GROUP "VG_director" FAULT`)
	if err != nil || ev.Kind != "GROUP" || ev.State != "FAULT" {
		t.Fatalf("%+v %v", ev, err)
	}
	// keepalived's vrrp_notify.c writes these states and events.
	for line, want := range map[string]string{
		`INSTANCE "VI_out" MASTER 150`:              "master",
		`INSTANCE "VI_out" BACKUP 100`:              "backup",
		`GROUP "VG_director" FAULT`:                 "fault",
		`INSTANCE "VI_out" STOP 0`:                  "fault",
		`INSTANCE "VI_out" DELETED 0`:               "fault",
		`INSTANCE "VI_out" MASTER_RX_LOWER_PRI 100`: "",
		`INSTANCE "VI_out" MASTER_PRIORITY 50`:      "",
		`INSTANCE "VI_out" BACKUP_PRIORITY 1`:       "",
		`INSTANCE "VI_out" {UNKNOWN} 1`:             "",
	} {
		ev, err := ParseNotifyLine(line)
		role, ok := ev.RoleOf()
		if err != nil || role != want || ok != (want != "") {
			t.Errorf("%s: role %q %v (%v), want %q", line, role, ok, err, want)
		}
	}
	for _, bad := range []string{"", "INSTANCE VI_1 MASTER", `INSTANCE "VI_1"`, `INSTANCE "VI_1" MASTER high`} {
		if _, err := ParseNotifyLine(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func FuzzParseNotifyLine(f *testing.F) {
	f.Add(`INSTANCE "VI_1" MASTER 100`)
	f.Add(`GROUP "G" BACKUP`)
	f.Fuzz(func(t *testing.T, s string) {
		ev, err := ParseNotifyLine(s)
		if err == nil && (ev.Kind == "" || ev.State == "") {
			t.Fatalf("accepted %q as %+v", s, ev)
		}
	})
}
