package director

import "testing"

func TestParseNotifyLine(t *testing.T) {
	ev, err := ParseNotifyLine(`INSTANCE "VI_out" MASTER 150` + "\n")
	if err != nil || ev.Kind != "INSTANCE" || ev.Name != "VI_out" || ev.State != "MASTER" || ev.Priority != 150 || ev.RoleOf() != "master" {
		t.Fatalf("%+v %v", ev, err)
	}
	ev, err = ParseNotifyLine(`GROUP "VG_director" FAULT`)
	if err != nil || ev.Kind != "GROUP" || ev.RoleOf() != "fault" {
		t.Fatalf("%+v %v", ev, err)
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
